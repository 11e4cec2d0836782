// m1-serve driven by the official `openai` npm package: the responses and streams it parses,
// and the errors it raises, are what real OpenAI clients will see.
// Usage: node openai_client.mjs BASE_URL API_KEY

import assert from 'node:assert/strict';
import OpenAI from 'openai';
import Ajv2020 from 'ajv/dist/2020.js';
import addFormats from 'ajv-formats';

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

// Structured outputs, each checked by ajv (an independent JSON Schema 2020-12 validator).
const ajv = new Ajv2020({ strict: false, allErrors: true });
addFormats(ajv);
function expectValid(schema, text, what) {
  const validate = ajv.compile(schema);
  const document = JSON.parse(text);
  assert.ok(validate(document), `${what}: ${text}: ${JSON.stringify(validate.errors)}`);
}
// The random model would reason for ever if it began to: the <think> token is biased away.
const thinkId = (await (await fetch(baseURL.replace(/\/v1$/, '/tokenize'), {
  method: 'POST', headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${apiKey}` },
  body: JSON.stringify({ prompt: '<think>' }),
})).json()).tokens[0];
const noReasoning = { [thinkId]: -100 };

const answerSchema = {
  type: 'object',
  properties: {
    answer: { enum: ['yes', 'no', 'maybe'] },
    score: { type: 'integer', minimum: -10, maximum: 10 },
    when: { type: 'string', format: 'date' },
    notes: { type: 'array', items: { type: 'string', maxLength: 6 }, maxItems: 2 },
    next: { anyOf: [{ type: 'null' }, { $ref: '#/$defs/step' }] },
  },
  required: ['answer', 'score', 'when', 'notes', 'next'],
  additionalProperties: false,
  $defs: { step: { type: 'object', properties: { id: { type: 'string', format: 'uuid' } }, required: ['id'],
                   additionalProperties: false } },
};
const jsonSchemaFormat = { type: 'json_schema', json_schema: { name: 'answer', schema: answerSchema, strict: true } };

await check('response_format json_schema', async () => {
  let documents = 0;
  for (const seed of [1, 2, 3]) {
    const reply = await client.chat.completions.create({
      model, messages, max_tokens: 160, temperature: 1, seed, n: 2, response_format: jsonSchemaFormat,
      logit_bias: noReasoning,
    });
    for (const choice of reply.choices) {
      if (choice.finish_reason === 'length') continue;
      assert.equal(choice.finish_reason, 'stop');
      expectValid(answerSchema, choice.message.content, `seed ${seed}`);
      ++documents;
    }
  }
  assert.ok(documents >= 3, `only ${documents} documents finished`);
});

await check('response_format json_schema streamed, and on /v1/completions', async () => {
  const request = { model, messages, max_tokens: 160, temperature: 1, seed: 4, response_format: jsonSchemaFormat,
                    logit_bias: noReasoning };
  const whole = await client.chat.completions.create(request);
  let text = '';
  for await (const chunk of await client.chat.completions.create({ ...request, stream: true })) {
    text += chunk.choices[0]?.delta?.content ?? '';
  }
  assert.equal(text, whole.choices[0].message.content);
  if (whole.choices[0].finish_reason === 'stop') expectValid(answerSchema, text, 'stream');
  const completion = await client.completions.create({
    model, prompt: 'JSON:', max_tokens: 160, temperature: 1, seed: 5, response_format: jsonSchemaFormat,
  });
  if (completion.choices[0].finish_reason === 'stop') expectValid(answerSchema, completion.choices[0].text, 'completion');
});

await check('response_format json_object', async () => {
  const reply = await client.chat.completions.create({
    model, messages, max_tokens: 120, temperature: 0, response_format: { type: 'json_object' }, logit_bias: noReasoning,
  });
  const content = reply.choices[0].message.content;
  assert.ok(content.startsWith('{'), content);
  if (reply.choices[0].finish_reason === 'stop') assert.equal(typeof JSON.parse(content), 'object');
});

await check('strict tools', async () => {
  const parameters = {
    type: 'object',
    properties: { city: { type: 'string', maxLength: 10 }, unit: { enum: ['C', 'F'] } },
    required: ['city', 'unit'],
    additionalProperties: false,
  };
  const tools = [{ type: 'function', function: { name: 'get_weather', strict: true, parameters } }];
  let calls = 0;
  for (const seed of [1, 2, 3]) {
    const reply = await client.chat.completions.create({
      model, messages, tools, tool_choice: 'required', max_tokens: 80, temperature: 1, seed,
    });
    const choice = reply.choices[0];
    if (choice.finish_reason === 'length') continue;
    assert.equal(choice.finish_reason, 'tool_calls');
    for (const call of choice.message.tool_calls) {
      assert.equal(call.function.name, 'get_weather');
      expectValid(parameters, call.function.arguments, `call, seed ${seed}`);
      ++calls;
    }
  }
  assert.ok(calls >= 1, 'no call finished');
});

await check('errors', async () => {
  await assert.rejects(client.chat.completions.create({
    model, messages,
    response_format: { type: 'json_schema', json_schema: { name: 'x', schema: { type: 'number', multipleOf: 2 } } },
  }), (error) => {
    assert.ok(error instanceof OpenAI.BadRequestError);
    assert.equal(error.param, 'response_format');
    assert.match(error.message, /multipleOf/);
    return true;
  });
  await assert.rejects(client.chat.completions.create({ model, messages, temperature: 5 }), (error) => {
    assert.ok(error instanceof OpenAI.BadRequestError);
    assert.equal(error.param, 'temperature');
    return true;
  });
  await assert.rejects(client.chat.completions.create({ model: 'gpt-4o', messages }), OpenAI.NotFoundError);
  const stranger = new OpenAI({ baseURL, apiKey: 'wrong', maxRetries: 0 });
  await assert.rejects(stranger.models.list(), OpenAI.AuthenticationError);
});
