// UTF-8 helpers shared by the tokenizers, the incremental detokenizer and loradctl (which compiles
// this file alone: it must stay free of torch and of other engine code): validation, decoding
// with U+FFFD replacement the way Rust's String::from_utf8_lossy does it (the `tokenizers`
// library's ByteLevel decoder), and the Unicode White_Space property the pre-tokenizer regexes
// mean by \s.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace lorad::engine {

inline constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

bool IsValidUtf8(std::string_view bytes);
// The offset of the first byte that does not start a well-formed character (an incomplete one at
// the end included); std::string_view::npos when `bytes` is UTF-8.
size_t FirstInvalidUtf8Byte(std::string_view bytes);

// Appends `bytes` to `out`, replacing each maximal ill-formed subsequence with one U+FFFD
// (Unicode's "substitution of maximal subparts", as from_utf8_lossy). When `final` is false a
// trailing sequence that is incomplete but could still become valid is not consumed. With
// `replacement_per_byte`, every byte of an ill-formed subsequence becomes one U+FFFD instead.
// Returns the number of bytes consumed.
size_t AppendUtf8Lossy(std::string_view bytes, bool final, std::string* out,
                       bool replacement_per_byte = false);

// The whole of `bytes` with ill-formed subsequences replaced.
std::string Utf8Lossy(std::string_view bytes);

// `text` cut to at most `max_bytes` bytes at a character boundary, with "..." after it when cut
// (a message that quotes user data: a record's text can be megabytes).
std::string Utf8Shortened(std::string_view text, size_t max_bytes);

// The value of `digits` read as hexadecimal (either case, up to 7 digits); -1 when empty or any
// is not a hex digit.
int HexValue(std::string_view digits);

// The byte a byte-fallback piece stands for ("<0x0A>" -> 10, as sentencepiece and tokenizers
// write them), or -1 when `piece` is not one.
int ByteFallbackValue(std::string_view piece);

// A run of byte-fallback tokens' bytes (<0x41>...) as the ByteFallback decoder writes it: as is
// when the run is valid UTF-8 as a whole, else one U+FFFD per byte.
void AppendByteFallbackRun(std::string_view run, std::string* out);

// Decodes the code point at `pos` (valid UTF-8 expected) and advances `pos`; an ill-formed byte
// decodes as U+FFFD and advances by one.
char32_t NextCodePoint(std::string_view text, size_t* pos);

void AppendCodePoint(char32_t cp, std::string* out);

// Unicode White_Space: what Oniguruma's \s matches in the tokenizers library.
bool IsUnicodeWhitespace(char32_t cp);

}  // namespace lorad::engine
