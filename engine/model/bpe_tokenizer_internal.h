// What bpe_tokenizer.cpp (encoding, decoding) and bpe_tokenizer_json.cpp (reading tokenizer.json)
// share: sentencepiece's word marker, GPT-2's byte alphabet and the merge table's key.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>

#include "engine/model/utf8.h"

namespace lorad::engine::bpe_internal {

// Sentencepiece's word marker, U+2581, that Metaspace puts for spaces.
inline constexpr char kWordMarker[] = "\xE2\x96\x81";

// GPT-2's byte alphabet: printable bytes stand for themselves, the others for U+0100 upwards,
// so that every byte is a visible character in vocab strings ("Ġ" is the space).
struct ByteAlphabet {
  std::string chars[256];                       // byte -> its character, UTF-8
  std::unordered_map<char32_t, uint8_t> bytes;  // character -> byte
  ByteAlphabet() {
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
      const char32_t cp = printable ? static_cast<char32_t>(b) : next++;
      AppendCodePoint(cp, &chars[b]);
      bytes[cp] = static_cast<uint8_t>(b);
    }
  }
};

inline const ByteAlphabet& Alphabet() {
  static const ByteAlphabet alphabet;
  return alphabet;
}

inline uint64_t PairKey(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

}  // namespace lorad::engine::bpe_internal
