#include "m1/stop.h"

#include <algorithm>

namespace m1 {
namespace {

bool is_continuation_byte(char c) { return (static_cast<unsigned char>(c) & 0xC0) == 0x80; }

// Bytes in the UTF-8 sequence that `lead` starts (1 for ASCII and for bytes that start none).
size_t sequence_length(char lead) {
  const auto byte = static_cast<unsigned char>(lead);
  if ((byte & 0xE0) == 0xC0) return 2;
  if ((byte & 0xF0) == 0xE0) return 3;
  if ((byte & 0xF8) == 0xF0) return 4;
  return 1;
}

// The largest n <= cut such that text[0, n) does not end inside a multi-byte character.
size_t character_boundary(std::string_view text, size_t cut) {
  size_t lead = cut;
  for (int back = 0; back < 4 && lead > 0; ++back) {
    --lead;
    if (!is_continuation_byte(text[lead]))
      return lead + sequence_length(text[lead]) > cut ? lead : cut;
  }
  return cut;  // no lead byte nearby: not UTF-8 here, nothing to keep together
}

}  // namespace

StopMatcher::StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {
  // An empty stop string would match before any text; it is ignored rather than rejected.
  std::erase_if(stops_, [](const std::string& stop) { return stop.empty(); });
}

std::string StopMatcher::push(std::string_view text) {
  if (stopped_) return {};
  held_.append(text);
  return release(character_boundary(held_, undecided_start()));
}

std::string StopMatcher::flush() {
  if (stopped_) return {};
  return release(held_.size());  // no more text: every partial match has failed
}

// Earliest match by start position. At equal starts the shorter stop string wins: it completes
// first, so streaming finds the same one however the text was split into pieces.
std::pair<size_t, const std::string*> StopMatcher::first_match() const {
  size_t best_start = std::string::npos;
  const std::string* best = nullptr;
  for (const std::string& stop : stops_) {
    const size_t start = held_.find(stop);
    if (start == std::string::npos) continue;
    if (start < best_start || (start == best_start && stop.size() < best->size())) {
      best_start = start;
      best = &stop;
    }
  }
  return {best_start, best};
}

// Earliest position from which the held text is a proper prefix of some stop string: whether a
// stop string starts there depends on text not seen yet.
size_t StopMatcher::undecided_start() const {
  const std::string_view held = held_;
  size_t start = held.size();
  for (const std::string& stop : stops_) {
    for (size_t i = held.size() - std::min(held.size(), stop.size() - 1); i < start; ++i) {
      if (std::string_view(stop).starts_with(held.substr(i))) {
        start = i;
        break;
      }
    }
  }
  return start;
}

// Emits held text up to `decided_end`, or stops at the first match if that lies within it. A
// match further on waits: an earlier stop string may still be completing before it.
std::string StopMatcher::release(size_t decided_end) {
  const auto [match_start, match] = first_match();
  if (match != nullptr && match_start <= decided_end) {
    std::string text = held_.substr(0, match_start);
    stopped_ = true;
    matched_ = *match;
    held_.clear();
    return text;
  }
  std::string text = held_.substr(0, decided_end);
  held_.erase(0, decided_end);
  return text;
}

}  // namespace m1
