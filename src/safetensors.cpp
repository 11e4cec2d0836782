// Reading (mmap + validation) and writing of safetensors files and sharded checkpoints.

#include "m1/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <limits>
#include <span>

#include <nlohmann/json.hpp>

#include "json_text.h"
#include "m1/error.h"

namespace m1 {

namespace fs = std::filesystem;
using nlohmann::json;

// A read-only private mapping of a whole file.
class MappedFile {
 public:
  explicit MappedFile(const fs::path& path) : path_(path.string()) {
    int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail("{}: cannot open: {}", path_, std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      fail("{}: not a regular file", path_);
    }
    size_ = size_t(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        ::close(fd);
        fail("{}: cannot map: {}", path_, std::strerror(errno));
      }
      data_ = static_cast<const std::byte*>(p);
    }
    ::close(fd);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() {
    if (data_) ::munmap(const_cast<std::byte*>(data_), size_);
  }

  const std::byte* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const std::byte* data_ = nullptr;
  size_t size_ = 0;
};

namespace {

// The header limit of the reference implementation: anything larger is not a real checkpoint.
constexpr uint64_t kMaxHeaderBytes = 100u << 20;

// Element sizes of every safetensors dtype, so tensors m1 does not use can still be validated.
int element_size(const std::string& dtype) {
  static const std::map<std::string, int> kSizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E4M3", 1}, {"F8_E5M2", 1}, {"I16", 2}, {"U16", 2},
      {"F16", 2},  {"BF16", 2}, {"I32", 4}, {"U32", 4},      {"F32", 4},     {"I64", 8}, {"U64", 8},
      {"F64", 8}};
  auto it = kSizes.find(dtype);
  return it == kSizes.end() ? 0 : it->second;
}

uint64_t read_le64(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | uint64_t(p[i]);
  return v;
}

std::vector<int64_t> parse_shape(const json& shape, const std::string& where) {
  if (!shape.is_array()) fail("{}: 'shape' must be a list of integers", where);
  std::vector<int64_t> dims;
  for (const json& d : shape) {
    if (!d.is_number_unsigned() || d.get<uint64_t>() > (uint64_t(1) << 40))
      fail("{}: bad dimension {} in 'shape'", where, json_brief(d));
    dims.push_back(d.get<int64_t>());
  }
  return dims;
}

// Number of elements, or nullopt-like -1 when it overflows what a file could hold.
int64_t checked_numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d != 0 && n > (int64_t(1) << 50) / d) return -1;
    n *= d;
  }
  return n;
}

struct HeaderEntry {
  TensorView view;
  uint64_t begin = 0, end = 0;
};

HeaderEntry parse_entry(const std::string& name, const json& spec, const std::string& file) {
  std::string where = fmt::format("{}: tensor {}", file, quote_name(name));
  if (!spec.is_object()) fail("{}: header entry must be an object", where);
  if (!spec.contains("dtype")) fail("{}: missing 'dtype'", where);
  if (!spec["dtype"].is_string()) fail("{}: 'dtype' must be a string", where);
  if (!spec.contains("shape")) fail("{}: missing 'shape'", where);
  if (!spec.contains("data_offsets")) fail("{}: missing 'data_offsets'", where);
  HeaderEntry e;
  e.view.name = name;
  e.view.file = file;
  e.view.dtype_name = spec["dtype"].get<std::string>();
  int size = element_size(e.view.dtype_name);
  if (size == 0) fail("{}: unknown dtype {}", where, quote_name(e.view.dtype_name));
  e.view.shape = parse_shape(spec["shape"], where);
  const json& offsets = spec["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
      !offsets[1].is_number_unsigned())
    fail("{}: 'data_offsets' must be two non-negative integers", where);
  e.begin = offsets[0].get<uint64_t>();
  e.end = offsets[1].get<uint64_t>();
  if (e.end < e.begin) fail("{}: data_offsets [{}, {}] end before they begin", where, e.begin, e.end);
  int64_t numel = checked_numel(e.view.shape);
  if (numel < 0 || uint64_t(numel) * uint64_t(size) != e.end - e.begin)
    fail("{}: data_offsets span {} bytes but shape {} of {} needs {}", where, e.end - e.begin,
         spec["shape"].dump(), e.view.dtype_name, numel < 0 ? std::string("too many") : std::to_string(numel * size));
  e.view.nbytes = size_t(e.end - e.begin);
  return e;
}

json parse_header(const MappedFile& f, uint64_t* data_start) {
  if (f.size() < 8) fail("{}: truncated: {} bytes, too short for a safetensors header", f.path(), f.size());
  uint64_t header_len = read_le64(f.data());
  if (header_len > kMaxHeaderBytes || header_len > f.size() - 8)
    fail("{}: header length {} runs past the end of the file ({} bytes); truncated or not a safetensors file",
         f.path(), header_len, f.size());
  const char* text = reinterpret_cast<const char*>(f.data() + 8);
  json header = json::parse(text, text + header_len, nullptr, false);
  if (header.is_discarded()) fail("{}: header is not valid JSON", f.path());
  if (!header.is_object()) fail("{}: header must be a JSON object", f.path());
  *data_start = 8 + header_len;
  return header;
}

// Empty tensors own no bytes; every other tensor must start at or after the furthest end so far.
void check_no_overlap(std::vector<HeaderEntry*>& entries, const std::string& file) {
  std::erase_if(entries, [](auto* e) { return e->begin == e->end; });
  std::sort(entries.begin(), entries.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
  const HeaderEntry* furthest = nullptr;
  for (HeaderEntry* e : entries) {
    if (furthest && e->begin < furthest->end)
      fail("{}: tensors {} and {} overlap", file, quote_name(furthest->view.name), quote_name(e->view.name));
    if (!furthest || e->end > furthest->end) furthest = e;
  }
}

std::string shard_name(size_t index, size_t count) {
  return fmt::format("model-{:05d}-of-{:05d}.safetensors", index + 1, count);
}

}  // namespace

int64_t TensorView::numel() const { return checked_numel(shape); }

DType TensorView::weight_dtype() const {
  auto t = dtype_from_name(dtype_name);
  if (!t || !is_float(*t)) fail("{}: tensor {} has dtype {}; weights must be BF16, F16 or F32", file, quote_name(name), quote_name(dtype_name));
  return *t;
}

Checkpoint::Checkpoint() = default;
Checkpoint::Checkpoint(Checkpoint&&) noexcept = default;
Checkpoint& Checkpoint::operator=(Checkpoint&&) noexcept = default;
Checkpoint::~Checkpoint() = default;

void Checkpoint::add_file(const fs::path& path) {
  auto file = std::make_unique<MappedFile>(path);
  uint64_t data_start = 0;
  json header = parse_header(*file, &data_start);
  uint64_t data_size = file->size() - data_start;
  std::vector<HeaderEntry> entries;
  for (auto& [name, spec] : header.items()) {
    if (name == "__metadata__") continue;
    entries.push_back(parse_entry(name, spec, file->path()));
  }
  std::vector<HeaderEntry*> order;
  for (HeaderEntry& e : entries) {
    if (e.end > data_size)
      fail("{}: tensor {}: data_offsets [{}, {}] past the end of the data ({} bytes); file truncated?",
           file->path(), quote_name(e.view.name), e.begin, e.end, data_size);
    if (tensors_.count(e.view.name))
      fail("{}: tensor {} also appears in another shard", file->path(), quote_name(e.view.name));
    order.push_back(&e);
  }
  check_no_overlap(order, file->path());
  for (HeaderEntry& e : entries) {
    e.view.data = file->data() + data_start + e.begin;
    int size = element_size(e.view.dtype_name);
    // Kernels read weights in place; a tensor the writer left misaligned is copied once.
    if (reinterpret_cast<uintptr_t>(e.view.data) % size_t(size) != 0) {
      std::shared_ptr<std::byte> copy(new std::byte[e.view.nbytes], std::default_delete<std::byte[]>());
      std::memcpy(copy.get(), e.view.data, e.view.nbytes);
      e.view.data = copy.get();
      owned_.push_back(std::move(copy));
    }
    tensors_.emplace(e.view.name, std::move(e.view));
  }
  mapped_.emplace_back(file->data(), file->size());
  files_.push_back(std::move(file));
}

Checkpoint Checkpoint::open_file(const fs::path& file) {
  Checkpoint c;
  c.add_file(file);
  return c;
}

Checkpoint Checkpoint::open(const fs::path& dir) {
  fs::path index_path = dir / "model.safetensors.index.json";
  std::error_code ec;
  if (!fs::exists(index_path, ec)) {
    if (fs::exists(dir / "model.safetensors", ec)) return open_file(dir / "model.safetensors");
    fail("{}: no model.safetensors.index.json or model.safetensors", dir.string());
  }
  std::ifstream in(index_path);
  if (!in) fail("{}: cannot open", index_path.string());
  json index = json::parse(in, nullptr, false);
  if (index.is_discarded()) fail("{}: not valid JSON", index_path.string());
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
    fail("{}: missing 'weight_map' object", index_path.string());
  std::map<std::string, std::vector<std::string>> by_shard;
  for (auto& [tensor, shard] : index["weight_map"].items()) {
    if (!shard.is_string()) fail("{}: weight_map[{}] must be a file name", index_path.string(), quote_name(tensor));
    std::string name = shard.get<std::string>();
    if (name.empty() || name.find('/') != std::string::npos || name == "." || name == "..")
      fail("{}: weight_map[{}] names {}, which is not a file in the checkpoint directory",
           index_path.string(), quote_name(tensor), quote_name(name));
    by_shard[name].push_back(tensor);
  }
  Checkpoint c;
  for (auto& [shard, tensors] : by_shard) {
    fs::path shard_path = dir / shard;
    if (!fs::exists(shard_path, ec))
      fail("{}: shard {} listed in {} is missing", shard_path.string(), quote_name(shard), index_path.filename().string());
    c.add_file(shard_path);
    for (const std::string& t : tensors) {
      auto it = c.tensors_.find(t);
      if (it == c.tensors_.end() || it->second.file != shard_path.string())
        fail("{}: tensor {} is listed in {} but not in this shard", shard_path.string(), quote_name(t),
             index_path.filename().string());
    }
  }
  return c;
}

Checkpoint Checkpoint::in_memory(const std::vector<TensorSpec>& tensors, const TensorFiller& fill) {
  // One anonymous mapping for all tensors, in huge pages where the kernel allows it: the weights
  // then read at the same speed from the first step on (a khugepaged collapse later would
  // otherwise speed runs up part way through).
  constexpr size_t kAlign = 64;
  size_t total = 0;
  for (const TensorSpec& t : tensors) total += (t.nbytes() + kAlign - 1) / kAlign * kAlign;
  void* region = ::mmap(nullptr, std::max<size_t>(total, 1), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (region == MAP_FAILED) fail("in-memory checkpoint: cannot map {} bytes: {}", total, std::strerror(errno));
  ::madvise(region, total, MADV_HUGEPAGE);  // advice only: without huge pages it still works
  Checkpoint c;
  c.owned_.emplace_back(static_cast<std::byte*>(region), [total](std::byte* p) { ::munmap(p, std::max<size_t>(total, 1)); });
  c.mapped_.emplace_back(static_cast<const std::byte*>(region), total);
  std::byte* next = static_cast<std::byte*>(region);
  for (const TensorSpec& t : tensors) {
    fill(t, std::span(next, t.nbytes()));
    TensorView view{t.name, "(memory)", std::string(dtype_name(t.dtype)), t.shape, next, t.nbytes()};
    if (!c.tensors_.emplace(t.name, std::move(view)).second)
      fail("in-memory checkpoint: tensor {} given twice", quote_name(t.name));
    next += (t.nbytes() + kAlign - 1) / kAlign * kAlign;
  }
  return c;
}

void Checkpoint::release(const TensorView& t) const {
  const size_t page = size_t(::sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(t.data), end = begin + t.nbytes;
  for (const std::span<const std::byte>& region : mapped_) {
    const auto first = reinterpret_cast<uintptr_t>(region.data()), last = first + region.size();
    if (begin < first || end > last) continue;
    // Only pages the tensor covers whole: its neighbours may still be needed.
    const uintptr_t from = (begin + page - 1) / page * page, to = end / page * page;
    if (to > from) ::madvise(reinterpret_cast<void*>(from), to - from, MADV_DONTNEED);  // advice: failure changes nothing
    return;
  }
}

const TensorView* Checkpoint::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

const TensorView& Checkpoint::require(const std::string& name, const std::vector<int64_t>& shape) const {
  const TensorView* t = find(name);
  if (!t) fail("checkpoint: tensor {} is missing", quote_name(name));
  if (t->shape != shape)
    fail("{}: tensor {} has shape {} but the config needs {}", t->file, quote_name(name), json(t->shape).dump(),
         json(shape).dump());
  t->weight_dtype();
  return *t;
}

size_t TensorSpec::nbytes() const {
  const int64_t cols = shape.empty() ? 1 : shape.back();
  return matrix_bytes(dtype, cols == 0 ? 0 : checked_numel(shape) / cols, cols);
}

void write_safetensors(const fs::path& file, const std::vector<TensorSpec>& given, const TensorFiller& fill) {
  std::vector<TensorSpec> tensors = given;
  std::stable_sort(tensors.begin(), tensors.end(), [](const TensorSpec& a, const TensorSpec& b) {
    return dtype_bits(a.dtype) > dtype_bits(b.dtype);
  });
  nlohmann::ordered_json header;
  header["__metadata__"] = {{"format", "pt"}};
  uint64_t offset = 0;
  for (const TensorSpec& t : tensors) {
    header[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.nbytes()}}};
    offset += t.nbytes();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keeps tensor data 8-byte aligned in the file
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  if (!out) fail("{}: cannot create", file.string());
  uint64_t len = text.size();
  unsigned char len_bytes[8];
  for (int i = 0; i < 8; ++i) len_bytes[i] = (unsigned char)(len >> (8 * i));
  out.write(reinterpret_cast<const char*>(len_bytes), 8);
  out.write(text.data(), std::streamsize(text.size()));
  std::vector<std::byte> buffer;
  for (const TensorSpec& t : tensors) {
    buffer.assign(t.nbytes(), std::byte{0});
    fill(t, buffer);
    out.write(reinterpret_cast<const char*>(buffer.data()), std::streamsize(buffer.size()));
  }
  if (!out.flush()) fail("{}: write failed (disk full?)", file.string());
}

void write_checkpoint(const fs::path& dir, const std::vector<TensorSpec>& tensors, const TensorFiller& fill,
                      size_t max_shard_bytes) {
  fs::create_directories(dir);
  if (max_shard_bytes == 0) {
    write_safetensors(dir / "model.safetensors", tensors, fill);
    return;
  }
  std::vector<std::vector<TensorSpec>> shards(1);
  size_t shard_bytes = 0, total = 0;
  for (const TensorSpec& t : tensors) {
    if (!shards.back().empty() && shard_bytes + t.nbytes() > max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(t);
    shard_bytes += t.nbytes();
    total += t.nbytes();
  }
  nlohmann::ordered_json index;
  index["metadata"] = {{"total_size", total}};
  index["weight_map"] = nlohmann::ordered_json::object();
  for (size_t i = 0; i < shards.size(); ++i) {
    std::string name = shard_name(i, shards.size());
    write_safetensors(dir / name, shards[i], fill);
    for (const TensorSpec& t : shards[i]) index["weight_map"][t.name] = name;
  }
  std::ofstream out(dir / "model.safetensors.index.json");
  out << index.dump(2) << "\n";
  if (!out.flush()) fail("{}: write failed", (dir / "model.safetensors.index.json").string());
}

}  // namespace m1
