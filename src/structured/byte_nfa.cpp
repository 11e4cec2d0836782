#include "structured/byte_nfa.h"

#include "m1/error.h"

namespace m1::structured {
namespace {

using ByteRange = std::pair<uint8_t, uint8_t>;

void encode(char32_t c, std::vector<uint8_t>& out) {
  std::string s;
  append_utf8(s, c);
  out.assign(s.begin(), s.end());
}

// Splits [lo, hi] (no surrogates) into runs whose UTF-8 forms are products of byte ranges.
void utf8_sequences(char32_t lo, char32_t hi, std::vector<std::vector<ByteRange>>& out) {
  if (lo > hi) return;
  for (char32_t max : {char32_t(0x7F), char32_t(0x7FF), char32_t(0xFFFF)})
    if (lo <= max && max < hi) {
      utf8_sequences(lo, max, out);
      utf8_sequences(max + 1, hi, out);
      return;
    }
  if (hi < 0x80) {
    out.push_back({{uint8_t(lo), uint8_t(hi)}});
    return;
  }
  const int n = lo < 0x800 ? 2 : lo < 0x10000 ? 3 : 4;
  for (int i = 1; i < n; ++i) {
    const char32_t m = (char32_t(1) << (6 * i)) - 1;
    if ((lo & ~m) != (hi & ~m)) {
      if ((lo & m) != 0) {
        utf8_sequences(lo, lo | m, out);
        utf8_sequences((lo | m) + 1, hi, out);
        return;
      }
      if ((hi & m) != m) {
        utf8_sequences(lo, (hi & ~m) - 1, out);
        utf8_sequences(hi & ~m, hi, out);
        return;
      }
    }
  }
  std::vector<uint8_t> a, b;
  encode(lo, a);
  encode(hi, b);
  std::vector<ByteRange> seq;
  for (size_t i = 0; i < a.size(); ++i) seq.push_back({a[i], b[i]});
  out.push_back(std::move(seq));
}

class Speller {
 public:
  Speller(ByteNfa& out, Spelling spelling) : out_(out), spelling_(spelling) {}

  // Byte paths from `from` to `to` for every member of `set`.
  void spell(const CodepointSet& set, int32_t from, int32_t to) {
    if (spelling_ == Spelling::kUtf8) {
      utf8(set, from, to);
      return;
    }
    CodepointSet plain = set.minus(CodepointSet::range(0, 0x1F));
    plain = plain.minus(CodepointSet::of('"')).minus(CodepointSet::of('\\'));
    utf8(plain, from, to);
    const CodepointSet escaped = set.minus(plain);
    if (escaped.empty()) return;
    const int32_t backslash = out_.add_state();
    out_.edge(from, '\\', '\\', backslash);
    if (escaped.contains('"')) out_.edge(backslash, '"', '"', to);
    if (escaped.contains('\\')) out_.edge(backslash, '\\', '\\', to);
    const CodepointSet controls = escaped.intersect(CodepointSet::range(0, 0x1F));
    if (controls.empty()) return;
    for (auto [c, letter] : {std::pair{8, 'b'}, {9, 't'}, {10, 'n'}, {12, 'f'}, {13, 'r'}})
      if (controls.contains(char32_t(c))) out_.edge(backslash, letter, letter, to);
    // \u00XX, in either case of hexadecimal letter.
    int32_t at = out_.add_state();
    out_.edge(backslash, 'u', 'u', at);
    for (int i = 0; i < 2; ++i) {
      const int32_t next = out_.add_state();
      out_.edge(at, '0', '0', next);
      at = next;
    }
    for (int high = 0; high < 2; ++high) {
      int32_t digit_state = -1;
      for (int low = 0; low < 16; ++low) {
        if (!controls.contains(char32_t(high * 16 + low))) continue;
        if (digit_state < 0) {
          digit_state = out_.add_state();
          out_.edge(at, '0' + high, '0' + high, digit_state);
        }
        if (low < 10) {
          out_.edge(digit_state, '0' + low, '0' + low, to);
        } else {
          out_.edge(digit_state, 'a' + low - 10, 'a' + low - 10, to);
          out_.edge(digit_state, 'A' + low - 10, 'A' + low - 10, to);
        }
      }
    }
  }

 private:
  void utf8(const CodepointSet& set, int32_t from, int32_t to) {
    std::vector<std::vector<ByteRange>> sequences;
    for (auto [lo, hi] : set.ranges()) utf8_sequences(lo, hi, sequences);
    for (const auto& seq : sequences) {
      int32_t at = from;
      for (size_t i = 0; i < seq.size(); ++i) {
        const int32_t next = i + 1 == seq.size() ? to : out_.add_state();
        out_.edge(at, seq[i].first, seq[i].second, next);
        at = next;
      }
    }
  }

  ByteNfa& out_;
  Spelling spelling_;
};

}  // namespace

int32_t ByteNfa::add_state() {
  if (states.size() >= kMaxByteStates)
    fail("grammar: too large (its automaton needs more than {} states)", kMaxByteStates);
  states.emplace_back();
  return int32_t(states.size() - 1);
}

ByteFragment add_spelled(ByteNfa& out, const CharNfa& nfa, Spelling spelling) {
  std::vector<int32_t> id(nfa.states.size());
  for (size_t s = 0; s < nfa.states.size(); ++s) id[s] = out.add_state();
  const ByteFragment f{out.add_state(), out.add_state()};
  out.states[size_t(f.start)].eps.push_back(id[size_t(nfa.start)]);
  Speller speller(out, spelling);
  for (size_t s = 0; s < nfa.states.size(); ++s) {
    const CharNfa::State& state = nfa.states[s];
    for (int32_t t : state.eps) out.states[size_t(id[s])].eps.push_back(id[size_t(t)]);
    for (const CharNfa::Edge& e : state.edges) speller.spell(e.set, id[s], id[size_t(e.to)]);
    if (state.accept) out.states[size_t(id[s])].eps.push_back(f.end);
  }
  return f;
}

ByteFragment add_bytes(ByteNfa& out, std::string_view bytes) {
  const ByteFragment f{out.add_state(), out.add_state()};
  int32_t at = f.start;
  for (size_t i = 0; i < bytes.size(); ++i) {
    const int32_t next = i + 1 == bytes.size() ? f.end : out.add_state();
    const auto b = static_cast<uint8_t>(bytes[i]);
    out.edge(at, b, b, next);
    at = next;
  }
  if (bytes.empty()) out.states[size_t(f.start)].eps.push_back(f.end);
  return f;
}

}  // namespace m1::structured
