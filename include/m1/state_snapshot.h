#pragma once
// Snapshots of a sequence's state held outside any sequence, in the portable form of
// SequenceState (host memory): restoring one into a new state, and snapshot files, which the
// prefix cache's disk tier and m1-generate --prompt-cache write and read.
//
// A file records the model (a fingerprint of config.json and the weights), the backend's numerics
// (device kind, kernels, precision), the state's shape, the scope it belongs to and its token
// prefix, and ends with a checksum of everything after the header. It is written atomically: a
// temporary file beside it, flushed, then renamed over it.

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "m1/backend.h"
#include "m1/error.h"
#include "m1/model.h"

namespace m1 {

// A snapshot as pieces of its portable form, owned elsewhere: KV ranges in token order (each as
// SequenceState::save_kv lays out a range), then the lightning states after the last of them.
struct SnapshotPieces {
  struct Range {
    std::span<const std::byte> rows;
    int64_t tokens = 0;
  };
  std::vector<Range> kv;
  std::span<const std::byte> lightning;

  int64_t tokens() const;
  size_t bytes() const;
};

// A copy of a whole state in its portable form.
struct StateCopy {
  int64_t tokens = 0;
  std::vector<std::byte> kv, lightning;
  SnapshotPieces pieces() const { return {{{kv, tokens}}, lightning}; }
};
StateCopy copy_state(const SequenceState& state);

// A new state of `model` holding the snapshot. Throws m1::Error if the pieces do not fit its shape.
std::unique_ptr<SequenceState> restore_state(const Model& model, const SnapshotPieces& pieces);

// What a snapshot's numbers depend on; a file made under another format is never used.
struct SnapshotFormat {
  std::string model;     // fingerprint of config.json and the weights: names, dtypes, shapes, sampled bytes
  std::string numerics;  // Backend::numerics()
  std::string kv_dtype;  // the KV rows' element type
  std::vector<int64_t> shape;  // StateShape: lightning layers, heads, head dim, softmax layers, KV heads
  int64_t lightning_bytes = 0, kv_row_bytes = 0;  // the portable form's sizes: fixed, and per token

  bool operator==(const SnapshotFormat&) const = default;
};

// The format of `model`'s states on its backend. Reads a few bytes of every weight (two small
// windows each) for the fingerprint.
SnapshotFormat snapshot_format(const Model& model);

// What a snapshot file's header says.
struct SnapshotFileInfo {
  std::string scope;            // who may use it (the prefix cache's scope; "" for m1-generate)
  std::vector<int32_t> tokens;  // the prefix its state has consumed
  uint64_t file_bytes = 0;
};

// A file that is not a usable snapshot; the message says why in one line, without the path.
class SnapshotFileError : public Error {
 public:
  using Error::Error;
};

// Throws m1::Error naming the path when the file cannot be written; nothing is left behind then.
void write_snapshot_file(const std::filesystem::path& path, const SnapshotFormat& format, const std::string& scope,
                         std::span<const int32_t> tokens, const SnapshotPieces& pieces);
// The header and token prefix, checked against `format` and the file's size (the state itself is
// checked when read). Throws SnapshotFileError.
SnapshotFileInfo read_snapshot_info(const std::filesystem::path& path, const SnapshotFormat& format);
// The file's state as a new state of `model`, handed out only once every byte has matched the
// checksum; `info` gets the header. Throws SnapshotFileError.
std::unique_ptr<SequenceState> read_snapshot_state(const std::filesystem::path& path, const SnapshotFormat& format,
                                                   const Model& model, SnapshotFileInfo& info);

}  // namespace m1
