#pragma once
// Classes of text that most tokens of a vocabulary fall into. A lexer state that treats every
// character of a class alike lets a token mask take all of the class's tokens up to some length
// at once, instead of trying them one by one. The classes are cut so that the common ways of
// telling characters apart (case, digits, '.' refusing line terminators, the characters JSON
// escapes, '<' which begins a marker's text) leave most of them whole.

#include <cstdint>

namespace m1::structured {

enum TextClass : int32_t {
  kLower = 0,         // a-z
  kLetters = 1,       // letters, some capital (the characters: A-Z a-z)
  kSpaceLower = 2,    // ' ' then a-z (the characters: a-z and ' ')
  kSpaceLetters = 3,  // ' ' then letters, some capital
  kDigits = 4,        // 0-9
  kAsciiText = 5,     // printable ASCII but '"', '\', '<' and digits
  kAsciiDigits = 6,   // the same with digits, some digit
  kUnicodeText = 7,   // kAsciiText's characters and non-ASCII ones but U+2028 and U+2029, some non-ASCII
  kTextClassCount = 8,
};

// The longest token (in characters) a class holds; longer ones are tried one by one.
constexpr int32_t kMaxRunLength = 31;

// Whether ASCII byte `b` is one of the class's characters.
constexpr bool in_text_class(TextClass c, uint8_t b) {
  const bool lower = b >= 'a' && b <= 'z';
  const bool letter = lower || (b >= 'A' && b <= 'Z');
  const bool digit = b >= '0' && b <= '9';
  const bool text = b >= 0x20 && b <= 0x7E && b != '"' && b != '\\' && b != '<';
  switch (c) {
    case kLower: return lower;
    case kLetters: return letter;
    case kSpaceLower: return lower || b == ' ';
    case kSpaceLetters: return letter || b == ' ';
    case kDigits: return digit;
    case kAsciiText:
    case kUnicodeText: return text && !digit;
    case kAsciiDigits: return text;
    default: return false;
  }
}

// The non-ASCII characters kUnicodeText leaves out: the line terminators '.' refuses.
constexpr bool outside_unicode_text(char32_t c) { return c == 0x2028 || c == 0x2029; }

}  // namespace m1::structured
