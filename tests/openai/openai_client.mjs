// m1-serve driven by the official `openai` npm package: the responses and streams it parses,
// and the errors it raises, are what real OpenAI clients will see.
// Usage: node openai_client.mjs BASE_URL API_KEY

import assert from 'node:assert/strict';
import OpenAI from 'openai';

const [baseURL, apiKey] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
const model = 'tiny';
const messages = [{ role: 'user', content: 'Tell me about lightning attention.' }];

async function check(name, body) {
  await body();
  console.log(`ok - ${name}`);
}

await check('models list', async () => {
  const models = await client.models.list();
  assert.deepEqual(models.data.map((m) => m.id), [model]);
});

const chat = await client.chat.completions.create({ model, messages, max_tokens: 16, temperature: 0 });

await check('chat completion', async () => {
  assert.equal(chat.object, 'chat.completion');
  assert.equal(chat.choices[0].message.role, 'assistant');
  assert.equal(typeof chat.choices[0].message.content, 'string');
  assert.ok(['stop', 'length'].includes(chat.choices[0].finish_reason));
  assert.equal(chat.usage.total_tokens, chat.usage.prompt_tokens + chat.usage.completion_tokens);
});

await check('chat completion stream', async () => {
  const stream = await client.chat.completions.create({
    model, messages, max_tokens: 16, temperature: 0, stream: true, stream_options: { include_usage: true },
  });
  let text = '';
  let finish = null;
  let usage = null;
  for await (const chunk of stream) {
    for (const choice of chunk.choices) {
      text += choice.delta.content ?? '';
      finish = choice.finish_reason ?? finish;
    }
    usage = chunk.usage ?? usage;
  }
  assert.equal(text, chat.choices[0].message.content);
  assert.equal(finish, chat.choices[0].finish_reason);
  assert.deepEqual(usage, chat.usage);
});

await check('tools are accepted', async () => {
  const tools = [{ type: 'function', function: { name: 'get_weather', parameters: { type: 'object' } } }];
  const reply = await client.chat.completions.create({ model, messages, tools, tool_choice: 'auto', max_tokens: 4 });
  assert.equal(reply.choices.length, 1);
});

await check('completion and its stream', async () => {
  const request = { model, prompt: 'Once upon a time', max_tokens: 8, temperature: 0, logprobs: 1 };
  const completion = await client.completions.create(request);
  assert.equal(completion.object, 'text_completion');
  assert.equal(completion.choices[0].logprobs.tokens.length, completion.usage.completion_tokens);
  let text = '';
  for await (const chunk of await client.completions.create({ ...request, stream: true })) {
    text += chunk.choices[0]?.text ?? '';
  }
  assert.equal(text, completion.choices[0].text);
});

await check('errors', async () => {
  await assert.rejects(client.chat.completions.create({ model, messages, temperature: 5 }), (error) => {
    assert.ok(error instanceof OpenAI.BadRequestError);
    assert.equal(error.param, 'temperature');
    return true;
  });
  await assert.rejects(client.chat.completions.create({ model: 'gpt-4o', messages }), OpenAI.NotFoundError);
  const stranger = new OpenAI({ baseURL, apiKey: 'wrong', maxRetries: 0 });
  await assert.rejects(stranger.models.list(), OpenAI.AuthenticationError);
});
