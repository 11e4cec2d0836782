#pragma once
// Safetensors checkpoints, single-file or sharded (model.safetensors.index.json): memory-mapped,
// validated on open, read in place; and the writer m1-mkmodel and the tests use.

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "m1/dtype.h"

namespace m1 {

// One tensor of a checkpoint, pointing into the mapped file (or an aligned copy of it).
struct TensorView {
  std::string name;
  std::string file;        // the file it came from, for error messages
  std::string dtype_name;  // as written in the header: "BF16", "F32", "I64", ...
  std::vector<int64_t> shape;
  const std::byte* data = nullptr;
  size_t nbytes = 0;

  int64_t numel() const;
  // The dtype as a model weight; throws m1::Error naming tensor and file if it is not F32/F16/BF16.
  DType weight_dtype() const;
};

class MappedFile;
struct TensorSpec;
using TensorFiller = std::function<void(const TensorSpec&, std::span<std::byte> out)>;

class Checkpoint {
 public:
  // A directory holding model.safetensors.index.json (sharded) or model.safetensors.
  static Checkpoint open(const std::filesystem::path& dir);
  // One safetensors file.
  static Checkpoint open_file(const std::filesystem::path& file);
  // Tensors held in memory, filled by `fill` (random models for benchmarks need no disk).
  static Checkpoint in_memory(const std::vector<TensorSpec>& tensors, const TensorFiller& fill);

  Checkpoint(Checkpoint&&) noexcept;
  Checkpoint& operator=(Checkpoint&&) noexcept;
  ~Checkpoint();

  const TensorView* find(const std::string& name) const;
  // The tensor, checked to exist with this shape and a weight dtype; throws m1::Error otherwise.
  const TensorView& require(const std::string& name, const std::vector<int64_t>& shape) const;
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  // Gives back the memory of a tensor that will not be read again (its quantized copy is held
  // instead): the whole pages it spans of a mapped file or an in-memory checkpoint are dropped
  // (madvise), so a checkpoint larger than memory can be quantized while it loads. Reading the
  // tensor afterwards sees the file again (or zeros, in memory).
  void release(const TensorView& tensor) const;

 private:
  Checkpoint();
  void add_file(const std::filesystem::path& file);

  std::vector<std::unique_ptr<MappedFile>> files_;
  std::vector<std::shared_ptr<std::byte>> owned_;  // in-memory tensors, and those a file left misaligned
  std::vector<std::span<const std::byte>> mapped_;   // regions release() may drop pages of
  std::map<std::string, TensorView> tensors_;
};

// A tensor to write: its bytes are produced by a callback when its turn comes, so checkpoints far
// larger than memory can be written one tensor at a time.
struct TensorSpec {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  size_t nbytes() const;
};

// Tensor data is laid out by element size, largest first (and in the given order among equals),
// so every tensor is aligned to its element size; `fill` is called in that order.
void write_safetensors(const std::filesystem::path& file, const std::vector<TensorSpec>& tensors,
                       const TensorFiller& fill);
// Writes `dir`/model.safetensors, or shards of at most max_shard_bytes (a tensor larger than that
// gets a shard of its own) named model-0000i-of-0000n.safetensors plus the index.
void write_checkpoint(const std::filesystem::path& dir, const std::vector<TensorSpec>& tensors,
                      const TensorFiller& fill, size_t max_shard_bytes = 0);

}  // namespace m1
