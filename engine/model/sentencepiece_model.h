// SentencePieceModel: a sentencepiece ModelProto (the bytes of a tokenizer.model) read by hand,
// and its BPE encoder. lorad does not link libsentencepiece: Debian's build bundles and exports its
// own copy of protobuf, which clashes with the libprotobuf gRPC uses in the same process.
#pragma once

#include <array>
#include <string>
#include <unordered_map>
#include <vector>

namespace lorad::engine {

class SentencePieceModel {
 public:
  // Loads a serialized ModelProto (the bytes of a tokenizer.model). Returns "" or the error.
  // Only BPE models are accepted (Llama 2, Mistral, TinyLlama); unigram models are refused.
  // The model's normalizer is not applied: transformers' LlamaTokenizer normalizes nothing and
  // decides the prefix itself, and so does SentencePieceTokenizer, which hands Encode text with
  // ' ' already escaped as '▁'.
  std::string LoadFromSerialized(const std::string& bytes);

  // Ids for `text`, as sentencepiece's BPE encoder gives them: user-defined pieces match whole,
  // then the adjacent pair whose merge has the highest score merges first (leftmost on ties),
  // and a symbol left outside the vocabulary becomes its <0xXX> byte pieces when the model has
  // byte fallback, else <unk>. Thread-safe.
  std::vector<int> Encode(const std::string& text) const;

  enum class Type {
    kNormal = 1,
    kUnknown = 2,
    kControl = 3,
    kUserDefined = 4,
    kUnused = 5,
    kByte = 6
  };
  struct Piece {
    std::string text;  // "▁the", "<s>", "<0x0A>"
    Type type = Type::kNormal;
  };
  const std::vector<Piece>& pieces() const { return pieces_; }  // indexed by id

 private:
  std::vector<Piece> pieces_;
  std::vector<float> scores_;                       // indexed by id
  std::unordered_map<std::string, int> mergeable_;  // normal + user-defined pieces -> id
  std::vector<std::string> user_defined_;           // longest first
  std::array<int, 256> byte_ids_{};                 // -1 where the model has no <0xXX>
  bool byte_fallback_ = false;
  int unk_id_ = 0;
};

}  // namespace lorad::engine
