// Fuzzes the sharded-checkpoint reader (Checkpoint::open on a directory): the input is
// model.safetensors.index.json, next to two small valid shards it can name.

#include <algorithm>

#include "fuzz_support.h"

namespace {

const m1::fuzz::ScratchDir scratch;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const auto fill = [](const m1::TensorSpec&, std::span<std::byte> out) { std::ranges::fill(out, std::byte{1}); };
  m1::write_safetensors(scratch.path() / "model-00001-of-00002.safetensors",
                        {{"embed", m1::DType::kBF16, {2, 3}}, {"norm", m1::DType::kF32, {3}}}, fill);
  m1::write_safetensors(scratch.path() / "model-00002-of-00002.safetensors", {{"head", m1::DType::kF16, {5}}},
                        fill);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  scratch.write("model.safetensors.index.json", m1::fuzz::as_text(data, size));
  m1::fuzz::m1_error_of([&] { m1::fuzz::touch_tensors(m1::Checkpoint::open(scratch.path())); });
  return 0;
}
