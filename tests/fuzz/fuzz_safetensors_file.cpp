// Fuzzes the safetensors reader (Checkpoint::open_file): the header length, the JSON header, and
// every tensor's dtype, shape and data offsets. A file it accepts must hold the tensors it lists.

#include "fuzz_support.h"

namespace {

const m1::fuzz::ScratchDir scratch;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto file = scratch.write("model.safetensors", m1::fuzz::as_text(data, size));
  m1::fuzz::m1_error_of([&] {
    const m1::Checkpoint checkpoint = m1::Checkpoint::open_file(file);
    m1::fuzz::check(m1::fuzz::touch_tensors(checkpoint) <= size, "the tensors fit in the file");
  });
  return 0;
}
