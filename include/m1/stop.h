#pragma once
// Stop strings over streamed text: matched across token boundaries, never emitted. Text that could
// still turn out to be the start of a stop string is held back until it is decided.
// Rules: the match that starts earliest in the text wins; at equal starts the shorter stop string
// (it completes first, so the result does not depend on how the text was split). Empty stop
// strings are ignored. Held-back text is whole UTF-8 characters: a piece that ends inside a
// multi-byte character keeps that character back until it is complete.

#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace m1 {

class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops);
  // Feeds newly decoded text; returns the part now safe to emit. After a stop string is found,
  // returns the text before it and stopped() becomes true; later calls return "".
  std::string push(std::string_view text);
  // At end of generation: the held-back text. It can still end in a stop: a completed stop string
  // is held while an earlier-starting one might complete; then the text is cut there as in push().
  std::string flush();
  bool stopped() const { return stopped_; }
  const std::string& matched() const { return matched_; }  // the stop string that ended it

 private:
  std::pair<size_t, const std::string*> first_match() const;  // (start, stop) or (npos, null)
  size_t undecided_start() const;
  std::string release(size_t decided_end);

  std::vector<std::string> stops_;
  std::string held_;
  bool stopped_ = false;
  std::string matched_;
};

}  // namespace m1
