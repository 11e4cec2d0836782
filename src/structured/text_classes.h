#pragma once
// Classes of text that most tokens of a vocabulary fall into (letters, a space then letters,
// digits, other printable ASCII, text with non-ASCII characters). A lexer state that treats every
// character of a class alike lets a token mask take all of the class's tokens up to some length
// at once, instead of trying them one by one.

#include <cstdint>

namespace m1::structured {

enum TextClass : int32_t {
  kLetters = 0,       // A-Z a-z
  kSpaceLetters = 1,  // ' ' then letters (the characters: letters and ' ')
  kDigits = 2,        // 0-9
  kAsciiText = 3,     // printable ASCII but '"', '\' and '<'
  kUnicodeText = 4,   // kAsciiText's characters and every non-ASCII character, at least one of those
  kTextClassCount = 5,
};

// The longest token (in characters) a class holds; longer ones are tried one by one.
constexpr int32_t kMaxRunLength = 31;

// Whether ASCII byte `b` is one of the class's characters.
constexpr bool in_text_class(TextClass c, uint8_t b) {
  const bool letter = (b >= 'A' && b <= 'Z') || (b >= 'a' && b <= 'z');
  switch (c) {
    case kLetters: return letter;
    case kSpaceLetters: return letter || b == ' ';
    case kDigits: return b >= '0' && b <= '9';
    case kAsciiText:
    case kUnicodeText: return b >= 0x20 && b <= 0x7E && b != '"' && b != '\\' && b != '<';
    default: return false;
  }
}

}  // namespace m1::structured
