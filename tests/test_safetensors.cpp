// Tests of the safetensors reader and writer: round trips (single file and sharded), the golden
// checkpoints, hand-made malformed files and indexes (each an m1::Error naming the file and the
// tensor at fault), Checkpoint::require, and a seeded mutation fuzz.

#include "m1/safetensors.h"
#include "test_support.h"

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <ostream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "m1/error.h"

namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using m1::DType;
using m1::testing::expect_error;
using m1::testing::read_file;

const fs::path kGolden = fs::path(M1_SOURCE_DIR) / "tests/data/golden";
constexpr const char* kIndexName = "model.safetensors.index.json";

// ---- bytes of hand-made files ----

std::string le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[size_t(i)] = char((v >> (8 * i)) & 0xff);
  return s;
}

// A safetensors file: the header's length, the header text as given, then the data.
std::string safetensors_bytes(const std::string& header, const std::string& data = "") {
  return le64(header.size()) + header + data;
}

std::string safetensors_bytes(const json& header, const std::string& data = "") {
  return safetensors_bytes(header.dump(), data);
}

json entry(const std::string& dtype, const json& shape, const json& offsets) {
  return {{"dtype", dtype}, {"shape", shape}, {"data_offsets", offsets}};
}

std::string f32_bytes(const std::vector<float>& values) {
  std::string s(values.size() * 4, '\0');
  std::memcpy(s.data(), values.data(), s.size());
  return s;
}

void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  ASSERT_TRUE(out.flush()) << path;
}


json read_json(const fs::path& path) { return json::parse(read_file(path)); }

// Where the data of a safetensors file starts: after the length field and the header.
size_t data_start(const std::string& bytes) {
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | uint8_t(bytes[size_t(i)]);
  return size_t(8 + header_len);
}

// ---- tensors written through the library, with contents that identify name and position ----

std::byte pattern_byte(const std::string& name, size_t i) {
  return std::byte((std::hash<std::string>{}(name) + i * 131) & 0xff);
}

void fill_pattern(const m1::TensorSpec& t, std::span<std::byte> out) {
  for (size_t i = 0; i < out.size(); ++i) out[i] = pattern_byte(t.name, i);
}

// Mixed dtypes and ranks; "odd.bf16" leaves the F32 tensors after it misaligned in a single file,
// and "big.f32" is larger than kShardBytes.
std::vector<m1::TensorSpec> mixed_specs() {
  return {{"embed.bf16", DType::kBF16, {3, 5}}, {"norm.f16", DType::kF16, {7}},
          {"odd.bf16", DType::kBF16, {1}},      {"cube.f32", DType::kF32, {2, 3, 4}},
          {"vector.f32", DType::kF32, {5}},     {"empty.f32", DType::kF32, {0, 3}},
          {"big.f32", DType::kF32, {16, 16}},   {"tail.bf16", DType::kBF16, {4, 2}}};
}
constexpr size_t kShardBytes = 64;

void expect_tensor_matches(const m1::Checkpoint& c, const m1::TensorSpec& spec) {
  SCOPED_TRACE(spec.name);
  const m1::TensorView* t = c.find(spec.name);
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->name, spec.name);
  EXPECT_EQ(t->dtype_name, m1::dtype_name(spec.dtype));
  EXPECT_EQ(t->weight_dtype(), spec.dtype);
  EXPECT_EQ(t->shape, spec.shape);
  ASSERT_EQ(t->nbytes, spec.nbytes());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t->data) % (size_t(m1::dtype_bits(spec.dtype)) / 8), 0u);
  for (size_t i = 0; i < t->nbytes; ++i)
    ASSERT_EQ(t->data[i], pattern_byte(spec.name, i)) << "byte " << i;
  EXPECT_EQ(&c.require(spec.name, spec.shape), t);
}

void expect_checkpoint_matches(const m1::Checkpoint& c, const std::vector<m1::TensorSpec>& specs) {
  EXPECT_EQ(c.tensors().size(), specs.size());
  for (const m1::TensorSpec& spec : specs) expect_tensor_matches(c, spec);
}

// Reads every byte of every tensor, so a view pointing outside its file shows up.
void touch_all_tensors(const m1::Checkpoint& c) {
  unsigned sum = 0;
  for (const auto& [name, t] : c.tensors())
    for (size_t i = 0; i < t.nbytes; ++i) sum += unsigned(t.data[i]);
  volatile unsigned sink = sum;
  (void)sink;
}

// ---- fixture: a fresh directory per test ----

class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name = std::string(info->test_suite_name()) + "." + info->name();
    std::replace(name.begin(), name.end(), '/', '_');
    dir_ = fs::temp_directory_path() / ("m1-test-safetensors-" + std::to_string(::getpid()) + "-" + name);
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  fs::path file() const { return dir_ / "model.safetensors"; }

  // Writes `bytes` as the single file and checks opening it throws naming the file and `parts`.
  void expect_file_error(const std::string& bytes, std::vector<std::string> parts) {
    write_file(file(), bytes);
    parts.push_back(file().string());
    expect_error([&] { m1::Checkpoint::open_file(file()); }, parts);
  }

  fs::path dir_;
};

// ---- round trips ----

using RoundTrip = TempDirTest;

TEST_F(RoundTrip, SingleFileReadsBackEveryTensor) {
  m1::write_checkpoint(dir_, mixed_specs(), fill_pattern);
  ASSERT_TRUE(fs::exists(file()));
  EXPECT_FALSE(fs::exists(dir_ / kIndexName));
  expect_checkpoint_matches(m1::Checkpoint::open(dir_), mixed_specs());
  expect_checkpoint_matches(m1::Checkpoint::open_file(file()), mixed_specs());
}

TEST_F(RoundTrip, SingleFileHeaderKeepsDataEightByteAligned) {
  m1::write_checkpoint(dir_, mixed_specs(), fill_pattern);
  EXPECT_EQ(data_start(read_file(file())) % 8, 0u);
}

TEST_F(RoundTrip, ShardedReadsBackEveryTensorAndIndexListsThem) {
  std::vector<m1::TensorSpec> specs = mixed_specs();
  m1::write_checkpoint(dir_, specs, fill_pattern, kShardBytes);
  EXPECT_FALSE(fs::exists(file()));
  json weight_map = read_json(dir_ / kIndexName).at("weight_map");
  ASSERT_EQ(weight_map.size(), specs.size());

  std::map<std::string, int> tensors_per_shard;
  for (const m1::TensorSpec& spec : specs) {
    ASSERT_TRUE(weight_map.contains(spec.name)) << spec.name;
    std::string shard = weight_map[spec.name].get<std::string>();
    EXPECT_TRUE(fs::exists(dir_ / shard)) << shard;
    ++tensors_per_shard[shard];
  }
  EXPECT_GE(tensors_per_shard.size(), 3u);
  EXPECT_EQ(tensors_per_shard[weight_map["big.f32"].get<std::string>()], 1);  // larger than a shard: alone

  m1::Checkpoint c = m1::Checkpoint::open(dir_);
  expect_checkpoint_matches(c, specs);
  for (const m1::TensorSpec& spec : specs)
    EXPECT_EQ(c.find(spec.name)->file, (dir_ / weight_map[spec.name].get<std::string>()).string());
}

TEST_F(RoundTrip, CheckpointWithoutTensorsOpensEmpty) {
  m1::write_checkpoint(dir_, {}, fill_pattern);
  EXPECT_TRUE(m1::Checkpoint::open(dir_).tensors().empty());
}

// ---- golden checkpoints ----

TEST(GoldenCheckpoint, TinyBf16SingleFileOpens) {
  m1::Checkpoint c = m1::Checkpoint::open(kGolden / "tiny-bf16");
  EXPECT_EQ(c.tensors().size(), 155u);
  const m1::TensorView& lm_head = c.require("lm_head.weight", {512, 64});
  EXPECT_EQ(lm_head.weight_dtype(), DType::kBF16);
  EXPECT_EQ(lm_head.nbytes, 512u * 64u * 2u);
  EXPECT_EQ(c.require("model.layers.0.block_sparse_moe.experts.0.w1.weight", {96, 64}).dtype_name, "BF16");
}

TEST(GoldenCheckpoint, OddF32ThreeShardsOpen) {
  fs::path dir = kGolden / "odd-f32";
  m1::Checkpoint c = m1::Checkpoint::open(dir);
  EXPECT_EQ(c.tensors().size(), read_json(dir / kIndexName).at("weight_map").size());
  std::set<std::string> files;
  for (const auto& [name, t] : c.tensors()) files.insert(t.file);
  EXPECT_EQ(files.size(), 3u);
  const m1::TensorView& lm_head = c.require("lm_head.weight", {700, 96});
  EXPECT_EQ(lm_head.weight_dtype(), DType::kF32);
  EXPECT_EQ(c.require("model.norm.weight", {96}).file, (dir / "model-00003-of-00003.safetensors").string());
}

// ---- malformed single files ----

struct BadFile {
  std::string name;
  std::string bytes;
  std::vector<std::string> parts;  // besides the file's path
};

void PrintTo(const BadFile& f, std::ostream* os) { *os << f.name; }

class MalformedFile : public TempDirTest, public ::testing::WithParamInterface<BadFile> {};

TEST_P(MalformedFile, GivesErrorNamingFileAndTensor) { expect_file_error(GetParam().bytes, GetParam().parts); }

const std::string kTwoF32 = f32_bytes({1.0f, 2.0f});

// A file holding one tensor "w" with this header entry and 8 bytes of data.
std::string file_with_entry(const json& spec) { return safetensors_bytes(json{{"w", spec}}, kTwoF32); }

std::vector<BadFile> bad_framing() {
  return {
      {"Empty", "", {"too short"}},
      {"FiveBytes", "\x01\x02\x03\x04\x05", {"too short"}},
      {"HeaderLengthPastEnd", le64(1000) + "{}", {"header length 1000"}},
      {"HeaderLengthTwoToThe63", le64(uint64_t(1) << 63) + "{}", {"header length 9223372036854775808"}},
      {"HeaderLengthAllOnes", le64(~uint64_t(0)) + "{}", {"header length"}},
      {"HeaderEmpty", le64(0), {"JSON"}},
      {"HeaderNotJson", safetensors_bytes(std::string("{\"w\": {\"dtype\": ")), {"JSON"}},
      {"HeaderTrailingGarbage", safetensors_bytes(std::string("{} {}")), {"JSON"}},
      {"HeaderJsonArray", safetensors_bytes(std::string("[1, 2]")), {"object"}},
      {"HeaderJsonString", safetensors_bytes(std::string("\"w\"")), {"object"}},
  };
}

std::vector<BadFile> bad_entries() {
  const json two = json::array({2});
  const json offsets = json::array({0, 8});
  return {
      {"EntryNotObject", file_with_entry(5), {"\"w\"", "object"}},
      {"MissingDtype", file_with_entry({{"shape", two}, {"data_offsets", offsets}}), {"\"w\"", "dtype"}},
      {"DtypeNotString", file_with_entry({{"dtype", 4}, {"shape", two}, {"data_offsets", offsets}}), {"\"w\"", "dtype"}},
      {"MissingShape", file_with_entry({{"dtype", "F32"}, {"data_offsets", offsets}}), {"\"w\"", "shape"}},
      {"MissingDataOffsets", file_with_entry({{"dtype", "F32"}, {"shape", two}}), {"\"w\"", "data_offsets"}},
      {"UnknownDtypeQ4", file_with_entry(entry("Q4", two, offsets)), {"\"w\"", "Q4"}},
      {"ShapeNegative", file_with_entry(entry("F32", {-2, -1}, offsets)), {"\"w\"", "shape"}},
      {"ShapeNonInteger", file_with_entry(entry("F32", json::array({2.5}), offsets)), {"\"w\"", "shape"}},
      {"ShapeEntryString", file_with_entry(entry("F32", json::array({"2"}), offsets)), {"\"w\"", "shape"}},
      {"ShapeNotList", file_with_entry(entry("F32", 2, offsets)), {"\"w\"", "shape"}},
      {"ShapeDimensionHuge", file_with_entry(entry("F32", json::array({uint64_t(1) << 41}), offsets)),
       {"\"w\"", "shape"}},
      {"ShapeProductOverflows", file_with_entry(entry("F32", {uint64_t(1) << 40, uint64_t(1) << 40}, offsets)),
       {"\"w\"", "data_offsets"}},
      {"DataOffsetsOneInteger", file_with_entry(entry("F32", two, json::array({8}))), {"\"w\"", "data_offsets"}},
      {"DataOffsetsThreeIntegers", file_with_entry(entry("F32", two, {0, 8, 8})), {"\"w\"", "data_offsets"}},
      {"DataOffsetsNegative", file_with_entry(entry("F32", two, {-8, 0})), {"\"w\"", "data_offsets"}},
      {"DataOffsetsFloat", file_with_entry(entry("F32", two, {0, 8.0})), {"\"w\"", "data_offsets"}},
      {"DataOffsetsNotList", file_with_entry(entry("F32", two, "0:8")), {"\"w\"", "data_offsets"}},
      {"DataOffsetsEndBeforeBegin", file_with_entry(entry("F32", json::array({0}), {8, 4})),
       {"\"w\"", "data_offsets"}},
      {"DataOffsetsPastTheData", file_with_entry(entry("F32", json::array({4}), {0, 16})), {"\"w\"", "past the end"}},
      {"DataOffsetsBeginPastTheData", file_with_entry(entry("F32", two, {8, 16})), {"\"w\"", "past the end"}},
      {"DataOffsetsNearUint64Max", file_with_entry(entry("F32", two, {~uint64_t(0) - 8, ~uint64_t(0)})),
       {"\"w\"", "data_offsets"}},
      {"SpanLargerThanShape", file_with_entry(entry("F32", json::array({1}), offsets)), {"\"w\"", "data_offsets"}},
      {"SpanSmallerThanShape", file_with_entry(entry("F32", json::array({3}), offsets)), {"\"w\"", "data_offsets"}},
      {"TensorsOverlap",
       safetensors_bytes(json{{"a", entry("F32", two, {0, 8})}, {"b", entry("F32", two, {4, 12})}},
                         f32_bytes({1, 2, 3})),
       {"\"a\"", "\"b\"", "overlap"}},
      {"TensorsShareTheirBytes",
       safetensors_bytes(json{{"a", entry("F32", two, offsets)}, {"b", entry("F32", two, offsets)}}, kTwoF32),
       {"\"a\"", "\"b\"", "overlap"}},
      // An empty tensor between two overlapping ones must not hide the overlap.
      {"OverlapAcrossAnEmptyTensor",
       safetensors_bytes(json{{"a", entry("F32", json::array({4}), {0, 16})},
                              {"b", entry("F32", json::array({0}), {4, 4})},
                              {"c", entry("F32", two, {8, 16})}},
                         f32_bytes({1, 2, 3, 4})),
       {"\"a\"", "\"c\"", "overlap"}},
      // Names from the file are quoted with escapes, so a newline in one keeps the message on one line.
      {"TensorNameWithNewline", safetensors_bytes(json{{"w\nx", entry("Q4", two, offsets)}}, kTwoF32), {"Q4"}},
  };
}

std::string bad_file_name(const ::testing::TestParamInfo<BadFile>& info) { return info.param.name; }

INSTANTIATE_TEST_SUITE_P(Framing, MalformedFile, ::testing::ValuesIn(bad_framing()), bad_file_name);
INSTANTIATE_TEST_SUITE_P(Entry, MalformedFile, ::testing::ValuesIn(bad_entries()), bad_file_name);

using SingleFile = TempDirTest;

TEST_F(SingleFile, TruncatedByAFewBytesNamesTheLastTensor) {
  m1::write_checkpoint(dir_, mixed_specs(), fill_pattern);
  std::string bytes = read_file(file());
  for (size_t cut : {1, 3, 7}) {
    SCOPED_TRACE(cut);
    expect_file_error(bytes.substr(0, bytes.size() - cut), {"\"tail.bf16\"", "past the end"});
  }
}

TEST_F(SingleFile, TruncatedInsideTheHeaderNamesTheFile) {
  m1::write_checkpoint(dir_, mixed_specs(), fill_pattern);
  expect_file_error(read_file(file()).substr(0, 40), {"header length"});
}

TEST_F(SingleFile, MisalignedDataIsCopiedAndReadsTheRightValues) {
  const std::vector<float> values = {1.5f, -2.25f, 3.0f};
  const std::string bf16("\x80\x3f\x00\xc0", 4);  // 1.0, -2.0
  std::string header = json{{"f", entry("F32", json::array({3}), {0, 12})},
                            {"h", entry("BF16", json::array({2}), {12, 16})}}.dump();
  while ((8 + header.size()) % 4 != 1) header += ' ';  // data starts at an odd offset
  write_file(file(), safetensors_bytes(header, f32_bytes(values) + bf16));

  m1::Checkpoint c = m1::Checkpoint::open_file(file());
  const m1::TensorView& f = c.require("f", {3});
  const m1::TensorView& h = c.require("h", {2});
  EXPECT_EQ(reinterpret_cast<uintptr_t>(f.data) % 4, 0u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(h.data) % 2, 0u);
  for (size_t i = 0; i < values.size(); ++i) EXPECT_EQ(m1::load_as_f32(f.data, DType::kF32, i), values[i]);
  EXPECT_EQ(m1::load_as_f32(h.data, DType::kBF16, 0), 1.0f);
  EXPECT_EQ(m1::load_as_f32(h.data, DType::kBF16, 1), -2.0f);
}

TEST_F(SingleFile, MetadataEntryIsNotATensor) {
  write_file(file(), safetensors_bytes(json{{"__metadata__", {{"format", "pt"}}},
                                            {"w", entry("F32", json::array({2}), {0, 8})}},
                                       kTwoF32));
  m1::Checkpoint c = m1::Checkpoint::open_file(file());
  EXPECT_EQ(c.tensors().size(), 1u);
  EXPECT_EQ(c.find("__metadata__"), nullptr);
}

// A deeply nested 'shape' entry gives an error, not a stack overflow while printing it. Run in a
// child process so a crash fails only this test.
using SingleFileDeathTest = TempDirTest;

TEST_F(SingleFileDeathTest, DeeplyNestedShapeGivesAnErrorNotACrash) {
  const size_t depth = 1000000;
  std::string header = R"({"w": {"dtype": "F32", "data_offsets": [0, 0], "shape": [)" + std::string(depth, '[') +
                       std::string(depth, ']') + "]}}";
  write_file(file(), safetensors_bytes(header));
  EXPECT_EXIT(
      {
        try {
          m1::Checkpoint::open_file(file());
        } catch (const m1::Error&) {
          std::exit(0);
        }
        std::exit(1);
      },
      ::testing::ExitedWithCode(0), "");
}

// ---- require ----

class Require : public TempDirTest {
 protected:
  void SetUp() override {
    TempDirTest::SetUp();
    m1::write_checkpoint(dir_, mixed_specs(), fill_pattern);
  }
};

TEST_F(Require, MissingTensorIsNamed) {
  m1::Checkpoint c = m1::Checkpoint::open(dir_);
  EXPECT_EQ(c.find("model.nope.weight"), nullptr);
  expect_error([&] { c.require("model.nope.weight", {2}); }, {"\"model.nope.weight\"", "missing"});
}

TEST_F(Require, WrongShapeNamesTensorFileAndBothShapes) {
  m1::Checkpoint c = m1::Checkpoint::open(dir_);
  expect_error([&] { c.require("cube.f32", {4, 3, 2}); }, {"\"cube.f32\"", file().string(), "[2,3,4]", "[4,3,2]"});
  expect_error([&] { c.require("vector.f32", {1, 5}); }, {"\"vector.f32\"", "[5]", "[1,5]"});
}

TEST_F(Require, IntegerDtypesAreNotWeights) {
  write_file(file(), safetensors_bytes(json{{"ids", entry("I64", json::array({2}), {0, 16})},
                                            {"mask", entry("U8", json::array({3}), {16, 19})}},
                                       std::string(19, '\x01')));
  m1::Checkpoint c = m1::Checkpoint::open_file(file());  // valid safetensors: it opens
  ASSERT_NE(c.find("ids"), nullptr);
  EXPECT_EQ(c.find("mask")->nbytes, 3u);
  expect_error([&] { c.require("ids", {2}); }, {"\"ids\"", "I64", file().string()});
  expect_error([&] { c.require("mask", {3}); }, {"\"mask\"", "U8", file().string()});
}

// ---- sharded checkpoints ----

class Sharded : public TempDirTest {
 protected:
  void write_index(const json& weight_map) {
    write_file(dir_ / kIndexName, json{{"metadata", json::object()}, {"weight_map", weight_map}}.dump());
  }
  // A valid shard holding F32 tensors of shape [2] with these names.
  void write_shard(const std::string& shard, const std::vector<std::string>& names) {
    std::vector<m1::TensorSpec> specs;
    for (const std::string& name : names) specs.push_back({name, DType::kF32, {2}});
    m1::write_safetensors(dir_ / shard, specs, fill_pattern);
  }
  void expect_open_error(std::vector<std::string> parts) {
    expect_error([&] { m1::Checkpoint::open(dir_); }, parts);
  }
  std::string index_path() const { return (dir_ / kIndexName).string(); }
};

TEST_F(Sharded, DirectoryWithoutCheckpointIsNamed) { expect_open_error({dir_.string()}); }

TEST_F(Sharded, MissingDirectoryIsNamed) {
  fs::path missing = dir_ / "no-such-model";
  expect_error([&] { m1::Checkpoint::open(missing); }, {missing.string()});
}

TEST_F(Sharded, IndexNotJson) {
  write_file(dir_ / kIndexName, "{\"weight_map\": {");
  expect_open_error({index_path(), "JSON"});
}

TEST_F(Sharded, IndexNotAnObject) {
  write_file(dir_ / kIndexName, "[]");
  expect_open_error({index_path(), "weight_map"});
}

TEST_F(Sharded, IndexWithoutWeightMap) {
  write_file(dir_ / kIndexName, R"({"metadata": {"total_size": 8}})");
  expect_open_error({index_path(), "weight_map"});
}

TEST_F(Sharded, WeightMapNotAnObject) {
  write_index(json::array({"model-00001-of-00001.safetensors"}));
  expect_open_error({index_path(), "weight_map"});
}

TEST_F(Sharded, WeightMapValueNotAString) {
  write_index({{"w", 3}});
  expect_open_error({index_path(), "weight_map[\"w\"]"});
}

TEST_F(Sharded, ListedShardMissingIsNamed) {
  write_shard("model-00001-of-00002.safetensors", {"a"});
  write_index({{"a", "model-00001-of-00002.safetensors"}, {"b", "model-00002-of-00002.safetensors"}});
  expect_open_error({"model-00002-of-00002.safetensors", "missing"});
}

TEST_F(Sharded, ListedShardThatIsADirectoryIsNamed) {
  fs::create_directories(dir_ / "shard.safetensors");
  write_index({{"w", "shard.safetensors"}});
  expect_open_error({(dir_ / "shard.safetensors").string()});
}

TEST_F(Sharded, TensorListedButAbsentFromItsShard) {
  write_shard("model-00001-of-00002.safetensors", {"a"});
  write_shard("model-00002-of-00002.safetensors", {"b"});
  write_index({{"a", "model-00001-of-00002.safetensors"}, {"b", "model-00001-of-00002.safetensors"}});
  expect_open_error({"\"b\"", "model-00001-of-00002.safetensors"});
}

TEST_F(Sharded, ShardNamesOutsideTheDirectoryAreRejected) {
  fs::path ckpt = dir_ / "ckpt";
  fs::create_directories(ckpt / "sub");
  // Valid files where each escaping name would lead, so opening one would succeed.
  write_shard("outside.safetensors", {"w"});
  write_shard("ckpt/sub/model.safetensors", {"w"});
  for (const std::string& shard : {std::string("../outside.safetensors"), (dir_ / "outside.safetensors").string(),
                                   std::string("sub/model.safetensors"), std::string("sub/../../outside.safetensors"),
                                   std::string(".."), std::string("."), std::string("")}) {
    SCOPED_TRACE(shard);
    write_file(ckpt / kIndexName, json{{"weight_map", {{"w", shard}}}}.dump());
    expect_error([&] { m1::Checkpoint::open(ckpt); }, {(ckpt / kIndexName).string(), "weight_map[\"w\"]"});
  }
}

TEST_F(Sharded, SameTensorInTwoShards) {
  write_shard("model-00001-of-00002.safetensors", {"a", "w"});
  write_shard("model-00002-of-00002.safetensors", {"b", "w"});
  write_index({{"a", "model-00001-of-00002.safetensors"},
               {"b", "model-00002-of-00002.safetensors"},
               {"w", "model-00001-of-00002.safetensors"}});
  expect_open_error({"\"w\"", "model-00002-of-00002.safetensors", "another shard"});
}

TEST_F(Sharded, MalformedShardIsNamed) {
  write_file(dir_ / "model-00001-of-00001.safetensors", le64(3) + "{x}");
  write_index({{"w", "model-00001-of-00001.safetensors"}});
  expect_open_error({(dir_ / "model-00001-of-00001.safetensors").string(), "JSON"});
}

TEST_F(Sharded, IndexTakesPrecedenceOverASingleFile) {
  write_shard("model.safetensors", {"single"});
  write_shard("model-00001-of-00001.safetensors", {"sharded"});
  write_index({{"sharded", "model-00001-of-00001.safetensors"}});
  m1::Checkpoint c = m1::Checkpoint::open(dir_);
  EXPECT_NE(c.find("sharded"), nullptr);
  EXPECT_EQ(c.find("single"), nullptr);
}

// ---- fuzz: any mutation of a valid file opens or throws m1::Error ----

using Fuzz = TempDirTest;

std::string mutate(const std::string& base, size_t header_end, std::mt19937_64& rng) {
  static const std::string kJsonChars = "{}[]\",:0123456789-.eE \\n";
  auto below = [&](size_t n) { return size_t(rng() % n); };
  std::string s = base;
  switch (below(4)) {
    case 0:  // flip a few bits of the length field or header
      for (size_t n = 1 + below(4); n > 0; --n) s[below(header_end)] ^= char(1 + below(255));
      break;
    case 1:  // replace a few header bytes with JSON syntax
      for (size_t n = 1 + below(3); n > 0; --n) s[8 + below(header_end - 8)] = kJsonChars[below(kJsonChars.size())];
      break;
    case 2:  // truncate
      s.resize(below(s.size()));
      break;
    default: {  // overwrite the length field: anything, or near the true length
      uint64_t len = below(2) ? rng() : uint64_t(header_end - 8) + below(33) - 16;
      s.replace(0, 8, le64(len));
    }
  }
  return s;
}

TEST_F(Fuzz, MutatedFilesOpenOrThrowError) {
  std::vector<m1::TensorSpec> specs = {{"a", DType::kF32, {2, 3}}, {"b", DType::kBF16, {5}}, {"c", DType::kF16, {0}}};
  m1::write_safetensors(file(), specs, fill_pattern);
  const std::string base = read_file(file());
  const size_t header_end = data_start(base);
  std::mt19937_64 rng(20240611);
  int opened = 0, rejected = 0;
  for (int iteration = 0; iteration < 3000; ++iteration) {
    std::string bytes = mutate(base, header_end, rng);
    write_file(file(), bytes);
    try {
      touch_all_tensors(m1::Checkpoint::open_file(file()));
      ++opened;
    } catch (const m1::Error& e) {
      ASSERT_EQ(std::string(e.what()).find('\n'), std::string::npos) << "iteration " << iteration << ": " << e.what();
      ++rejected;
    } catch (const std::exception& e) {
      FAIL() << "iteration " << iteration << ": expected m1::Error, got: " << e.what();
    }
  }
  EXPECT_GT(opened, 0);
  EXPECT_GT(rejected, 0);
}

}  // namespace
