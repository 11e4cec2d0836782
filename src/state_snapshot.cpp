#include "m1/state_snapshot.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>

#include <nlohmann/json.hpp>

#include "m1/content_hash.h"
#include "m1/config.h"

namespace m1 {
namespace {

// File layout: the signature, the header's length (u64), the header (JSON), the payload, and the
// payload's checksum (u64). Payload: the token prefix (i32 each), the lightning states, then the
// KV rows in pieces of at most kPieceTokens tokens, each a u64 token count and its rows.
constexpr char kSignature[8] = {'M', '1', 'S', 'N', 'A', 'P', '0', '1'};
constexpr uint64_t kMaxHeaderBytes = uint64_t(1) << 20;
constexpr int64_t kPieceTokens = 1024;

// Bytes of one token's rows in one of the 2 * softmax_layers blocks of a KV range.
int64_t block_row_bytes(const SnapshotFormat& f) {
  const int64_t blocks = 2 * f.shape.at(3);
  return blocks > 0 ? f.kv_row_bytes / blocks : 0;
}

class FileWriter {
 public:
  explicit FileWriter(const std::filesystem::path& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd_ < 0) fail_errno();
  }
  ~FileWriter() {
    if (fd_ >= 0) ::close(fd_);
  }
  void write(const void* data, size_t size, bool hashed = true) {
    if (hashed) hash_.update(data, size);
    for (const auto* p = static_cast<const char*>(data); size > 0;) {
      const ssize_t n = ::write(fd_, p, size);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) fail_errno();
      p += n, size -= size_t(n);
    }
  }
  template <class T>
  void write_value(const T& value, bool hashed = true) {
    write(&value, sizeof value, hashed);
  }
  uint64_t checksum() const { return hash_.value(); }
  void finish() {
    if (::fsync(fd_) != 0) fail_errno();
    const int fd = std::exchange(fd_, -1);
    if (::close(fd) != 0) fail_errno();
  }

 private:
  [[noreturn]] void fail_errno() const { fail("{}: {}", path_.string(), std::strerror(errno)); }

  std::filesystem::path path_;
  int fd_ = -1;
  ContentHash hash_;
};

nlohmann::json header_json(const SnapshotFormat& f, const std::string& scope, int64_t tokens, uint64_t payload) {
  return {{"version", 1},         {"model", f.model},          {"numerics", f.numerics},
          {"kv_dtype", f.kv_dtype}, {"shape", f.shape},        {"lightning_bytes", f.lightning_bytes},
          {"kv_row_bytes", f.kv_row_bytes}, {"scope", scope}, {"tokens", tokens},
          {"payload_bytes", payload}};
}

// The payload's size: tokens, lightning states, and every piece with its count.
uint64_t payload_bytes(const SnapshotFormat& f, const SnapshotPieces& pieces) {
  uint64_t bytes = uint64_t(pieces.tokens()) * sizeof(int32_t) + pieces.lightning.size();
  for (const SnapshotPieces::Range& r : pieces.kv)
    bytes += uint64_t((r.tokens + kPieceTokens - 1) / kPieceTokens) * sizeof(uint64_t) + uint64_t(r.tokens * f.kv_row_bytes);
  return bytes;
}

void write_payload(FileWriter& out, const SnapshotFormat& f, std::span<const int32_t> tokens, const SnapshotPieces& pieces) {
  out.write(tokens.data(), tokens.size_bytes());
  out.write(pieces.lightning.data(), pieces.lightning.size());
  const int64_t row = block_row_bytes(f), blocks = 2 * f.shape.at(3);
  for (const SnapshotPieces::Range& r : pieces.kv)
    for (int64_t a = 0; a < r.tokens; a += kPieceTokens) {
      const int64_t n = std::min(kPieceTokens, r.tokens - a);
      out.write_value(uint64_t(n));
      // Rows [a, a + n) of each block of the range: the piece in the range's own layout.
      for (int64_t block = 0; block < blocks; ++block)
        out.write(r.rows.data() + (block * r.tokens + a) * row, size_t(n * row));
    }
}

// A snapshot file opened for reading, its header checked and its token prefix read; `hash` has
// taken every payload byte read so far.
struct SnapshotReader {
  std::ifstream in;
  SnapshotFileInfo info;
  ContentHash hash;
  uint64_t payload_left = 0;

  void read(void* data, size_t size) {
    if (size > payload_left || !in.read(static_cast<char*>(data), std::streamsize(size)))
      throw SnapshotFileError("truncated: the payload ends early");
    payload_left -= size;
    hash.update(data, size);
  }
};

template <class T>
T field(const nlohmann::json& header, const char* name) {
  const auto it = header.find(name);
  try {
    if (it == header.end()) throw SnapshotFileError(fmt::format("header: {} is missing", name));
    return it->get<T>();
  } catch (const nlohmann::json::exception&) {
    throw SnapshotFileError(fmt::format("header: {} has the wrong type", name));
  }
}

void check_format(const nlohmann::json& header, const SnapshotFormat& f) {
  if (field<int>(header, "version") != 1)
    throw SnapshotFileError(fmt::format("version {} is not one this build reads (1)", field<int>(header, "version")));
  const auto model = field<std::string>(header, "model");
  if (model != f.model)
    throw SnapshotFileError(fmt::format("made for another model (fingerprint {}; this one is {})", model, f.model));
  const auto numerics = field<std::string>(header, "numerics");
  if (numerics != f.numerics)
    throw SnapshotFileError(fmt::format("made by another backend or precision ({}; here {})", numerics, f.numerics));
  if (field<std::string>(header, "kv_dtype") != f.kv_dtype || field<std::vector<int64_t>>(header, "shape") != f.shape ||
      field<int64_t>(header, "lightning_bytes") != f.lightning_bytes ||
      field<int64_t>(header, "kv_row_bytes") != f.kv_row_bytes)
    throw SnapshotFileError("made for another state layout");
}

void open_snapshot(SnapshotReader& r, const std::filesystem::path& path, const SnapshotFormat& format) {
  std::error_code ec;
  const uint64_t size = std::filesystem::file_size(path, ec);
  if (ec) throw SnapshotFileError(fmt::format("cannot read: {}", ec.message()));
  r.in.open(path, std::ios::binary);
  if (!r.in) throw SnapshotFileError(fmt::format("cannot open: {}", std::strerror(errno)));
  char signature[sizeof kSignature];
  uint64_t header_bytes = 0;
  if (!r.in.read(signature, sizeof signature) || std::memcmp(signature, kSignature, sizeof kSignature) != 0)
    throw SnapshotFileError("not a snapshot file (no M1SNAP01 signature)");
  if (!r.in.read(reinterpret_cast<char*>(&header_bytes), sizeof header_bytes) || header_bytes > kMaxHeaderBytes ||
      header_bytes > size)
    throw SnapshotFileError("not a snapshot file (bad header length)");
  std::string text(header_bytes, '\0');
  if (!r.in.read(text.data(), std::streamsize(header_bytes))) throw SnapshotFileError("truncated inside the header");
  const nlohmann::json header = nlohmann::json::parse(text, nullptr, false);
  if (!header.is_object()) throw SnapshotFileError("header: not a JSON object");
  check_format(header, format);
  r.info.scope = field<std::string>(header, "scope");
  const auto tokens = field<int64_t>(header, "tokens");
  r.payload_left = field<uint64_t>(header, "payload_bytes");
  const uint64_t expected = sizeof kSignature + sizeof header_bytes + header_bytes + r.payload_left + sizeof(uint64_t);
  if (tokens < 1 || r.payload_left > size || expected != size)
    throw SnapshotFileError(fmt::format("{} bytes where the header describes {}: truncated or damaged", size, expected));
  if (uint64_t(tokens) * sizeof(int32_t) + uint64_t(format.lightning_bytes) > r.payload_left)
    throw SnapshotFileError("header: the payload is too small for its tokens");
  r.info.file_bytes = size;
  r.info.tokens.resize(size_t(tokens));
  r.read(r.info.tokens.data(), r.info.tokens.size() * sizeof(int32_t));
}

std::atomic<uint64_t> temporary_counter{0};

}  // namespace

int64_t SnapshotPieces::tokens() const {
  int64_t total = 0;
  for (const Range& r : kv) total += r.tokens;
  return total;
}

size_t SnapshotPieces::bytes() const {
  size_t total = lightning.size();
  for (const Range& r : kv) total += r.rows.size();
  return total;
}

StateCopy copy_state(const SequenceState& state) {
  StateCopy copy{state.length(), std::vector<std::byte>(state.kv_bytes(state.length())),
                 std::vector<std::byte>(state.lightning_bytes())};
  state.save_kv(0, copy.tokens, copy.kv);
  state.save_lightning(copy.lightning);
  return copy;
}

std::unique_ptr<SequenceState> restore_state(const Model& model, const SnapshotPieces& pieces) {
  auto state = model.new_sequence();
  for (const SnapshotPieces::Range& r : pieces.kv) state->append_kv(r.rows, r.tokens);
  state->load_lightning(pieces.lightning);
  return state;
}

SnapshotFormat snapshot_format(const Model& model) {
  SnapshotFormat f;
  const auto probe = model.new_sequence();
  const StateShape s = model.state_shape();
  f.numerics = model.numerics();
  f.kv_dtype = std::string(dtype_name(probe->kv_dtype()));
  f.shape = {s.lightning_layers, s.heads, s.head_dim, s.softmax_layers, s.kv_heads};
  f.lightning_bytes = int64_t(probe->lightning_bytes());
  f.kv_row_bytes = int64_t(probe->kv_bytes(1));
  // The weights' identity: every tensor's name, type and shape, and its first and last bytes
  // (a checkpoint written again with other values differs there), without reading it all.
  ContentHash h;
  h.update(config_to_json(model.config()).dump());
  // Weights quantized at load hold other values than the checkpoint's.
  const LoadOptions& load = model.load_options();
  if (load.quantize) {
    h.update(std::string(dtype_name(load.quantize->type)));
    h.update_value(load.quantize->group_size);
    h.update_value(uint8_t(load.quantize_lm_head));
  }
  constexpr size_t kWindow = 64;
  for (const auto& [name, t] : model.checkpoint().tensors()) {
    h.update(name);
    h.update(t.dtype_name);
    for (int64_t dim : t.shape) h.update_value(dim);
    h.update_value(uint64_t(t.nbytes));
    const size_t window = std::min(kWindow, t.nbytes);
    h.update(t.data, window);
    h.update(t.data + t.nbytes - window, window);
  }
  f.model = fmt::format("{:016x}", h.value());
  return f;
}

void write_snapshot_file(const std::filesystem::path& path, const SnapshotFormat& format, const std::string& scope,
                         std::span<const int32_t> tokens, const SnapshotPieces& pieces) {
  if (pieces.tokens() != int64_t(tokens.size()) || tokens.empty())
    fail("{}: a snapshot of {} tokens given {} tokens of KV rows", path.string(), tokens.size(), pieces.tokens());
  const uint64_t payload = payload_bytes(format, pieces);
  const std::string header = header_json(format, scope, int64_t(tokens.size()), payload).dump();
  std::filesystem::path temporary = path;
  temporary += fmt::format(".tmp.{}.{}", ::getpid(), temporary_counter.fetch_add(1));
  try {
    FileWriter out(temporary);
    out.write(kSignature, sizeof kSignature, false);
    out.write_value(uint64_t(header.size()), false);
    out.write(header.data(), header.size(), false);
    write_payload(out, format, tokens, pieces);
    out.write_value(out.checksum(), false);
    out.finish();
    std::filesystem::rename(temporary, path);
  } catch (const std::exception& error) {
    std::error_code ignored;
    std::filesystem::remove(temporary, ignored);
    fail("{}: cannot write the snapshot: {}", path.string(), error.what());
  }
}

SnapshotFileInfo read_snapshot_info(const std::filesystem::path& path, const SnapshotFormat& format) {
  SnapshotReader r;
  open_snapshot(r, path, format);
  return std::move(r.info);
}

std::unique_ptr<SequenceState> read_snapshot_state(const std::filesystem::path& path, const SnapshotFormat& format,
                                                   const Model& model, SnapshotFileInfo& info) {
  SnapshotReader r;
  open_snapshot(r, path, format);
  std::vector<std::byte> lightning(size_t(format.lightning_bytes)), rows;
  r.read(lightning.data(), lightning.size());
  auto state = model.new_sequence();
  for (int64_t left = int64_t(r.info.tokens.size()); left > 0;) {
    uint64_t n = 0;
    r.read(&n, sizeof n);
    if (n < 1 || n > uint64_t(std::min(left, kPieceTokens)))
      throw SnapshotFileError(fmt::format("a piece of {} tokens where at most {} remain", n, std::min(left, kPieceTokens)));
    rows.resize(size_t(int64_t(n) * format.kv_row_bytes));
    r.read(rows.data(), rows.size());
    state->append_kv(rows, int64_t(n));
    left -= int64_t(n);
  }
  uint64_t checksum = 0;
  if (r.payload_left != 0 || !r.in.read(reinterpret_cast<char*>(&checksum), sizeof checksum))
    throw SnapshotFileError("the payload does not end where the header says");
  if (checksum != r.hash.value()) throw SnapshotFileError("checksum mismatch: the file is corrupt");
  state->load_lightning(lightning);
  info = std::move(r.info);
  return state;
}

}  // namespace m1
