#include "engine/model/sentencepiece_model.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <queue>

namespace lorad::engine {
namespace {

// Protocol buffer wire format, just enough to read ModelProto.pieces: each field is a varint tag
// (field number << 3 | wire type) followed by a varint (type 0), 8 bytes (1), a varint length
// and that many bytes (2), or 4 bytes (5).
bool ReadVarint(const std::string& s, size_t* pos, uint64_t* value) {
  *value = 0;
  for (int shift = 0; shift < 64 && *pos < s.size(); shift += 7) {
    const auto b = static_cast<uint8_t>(s[(*pos)++]);
    *value |= static_cast<uint64_t>(b & 0x7F) << shift;
    if ((b & 0x80) == 0) return true;
  }
  return false;
}

struct Field {
  uint32_t number = 0;
  uint64_t varint = 0;   // wire type 0
  uint32_t fixed32 = 0;  // wire type 5
  std::string payload;   // wire type 2
  bool is_bytes = false;
};

// Reads every field of one message; false when the bytes are not a well-formed message.
bool ReadFields(const std::string& message, std::vector<Field>* fields) {
  size_t pos = 0;
  while (pos < message.size()) {
    uint64_t tag = 0;
    if (!ReadVarint(message, &pos, &tag)) return false;
    Field f;
    f.number = static_cast<uint32_t>(tag >> 3);
    switch (tag & 7) {
      case 0:
        if (!ReadVarint(message, &pos, &f.varint)) return false;
        break;
      case 1:
        if (message.size() - pos < 8) return false;
        pos += 8;
        break;
      case 2: {
        uint64_t len = 0;
        if (!ReadVarint(message, &pos, &len) || len > message.size() - pos) return false;
        f.payload = message.substr(pos, len);
        f.is_bytes = true;
        pos += len;
        break;
      }
      case 5:
        if (message.size() - pos < 4) return false;
        std::memcpy(&f.fixed32, message.data() + pos, 4);  // little-endian, as the host
        pos += 4;
        break;
      default:
        return false;
    }
    fields->push_back(std::move(f));
  }
  return true;
}

// sentencepiece's TrainerSpec.ModelType.
constexpr uint64_t kModelTypeBpe = 2;

// Length of the UTF-8 character that starts with `lead` (1 for a stray continuation byte, as
// sentencepiece treats malformed input one byte at a time).
size_t Utf8CharLength(unsigned char lead) {
  if (lead >= 0xF0 && lead < 0xF8) return 4;
  if (lead >= 0xE0) return lead < 0xF0 ? 3 : 1;
  if (lead >= 0xC0) return 2;
  return 1;
}

}  // namespace

std::string SentencePieceModel::LoadFromSerialized(const std::string& bytes) {
  std::vector<Field> fields;
  if (!ReadFields(bytes, &fields)) return "not a sentencepiece model (malformed protobuf)";
  pieces_.clear();
  scores_.clear();
  mergeable_.clear();
  user_defined_.clear();
  byte_ids_.fill(-1);
  byte_fallback_ = false;
  uint64_t model_type = 1;  // TrainerSpec's default: unigram
  for (const Field& f : fields) {
    if (f.number == 2 && f.is_bytes) {  // ModelProto.trainer_spec
      std::vector<Field> spec;
      if (!ReadFields(f.payload, &spec))
        return "not a sentencepiece model (malformed trainer_spec)";
      for (const Field& g : spec) {
        if (g.number == 3 && !g.is_bytes) model_type = g.varint;       // model_type
        if (g.number == 35 && !g.is_bytes) byte_fallback_ = g.varint;  // byte_fallback
      }
    }
    if (f.number != 1 || !f.is_bytes) continue;  // ModelProto.pieces
    std::vector<Field> sub;
    if (!ReadFields(f.payload, &sub)) return "not a sentencepiece model (malformed piece)";
    Piece piece;
    float score = 0.0f;
    for (const Field& g : sub) {
      if (g.number == 1 && g.is_bytes) piece.text = g.payload;
      if (g.number == 2 && !g.is_bytes) std::memcpy(&score, &g.fixed32, sizeof score);
      if (g.number == 3 && !g.is_bytes) piece.type = static_cast<Type>(g.varint);
    }
    pieces_.push_back(std::move(piece));
    scores_.push_back(score);
  }
  if (pieces_.empty()) return "not a sentencepiece model (no pieces)";
  if (model_type != kModelTypeBpe) {
    return "sentencepiece model type " + std::to_string(model_type) +
           " is not supported: lorad reads BPE tokenizer.model files (Llama 2, Mistral, "
           "TinyLlama); for other tokenizers use the folder's tokenizer.json";
  }
  bool have_unk = false;
  for (int id = 0; id < static_cast<int>(pieces_.size()); ++id) {
    const Piece& p = pieces_[id];
    if (p.type == Type::kNormal || p.type == Type::kUserDefined) mergeable_.emplace(p.text, id);
    if (p.type == Type::kUserDefined) user_defined_.push_back(p.text);
    if (p.type == Type::kUnknown && !have_unk) {
      unk_id_ = id;
      have_unk = true;
    }
    unsigned value = 0;
    if (p.type == Type::kByte && p.text.size() == 6 &&
        std::sscanf(p.text.c_str(), "<0x%2X>", &value) == 1 && value < 256) {
      byte_ids_[value] = id;
    }
  }
  if (!have_unk) return "not a sentencepiece model (no <unk> piece)";
  std::sort(user_defined_.begin(), user_defined_.end(),
            [](const std::string& a, const std::string& b) { return a.size() > b.size(); });
  return "";
}

std::vector<int> SentencePieceModel::Encode(const std::string& text) const {
  // Symbols form a linked list over `text`; a merge grows the left symbol and empties the right.
  struct Symbol {
    int prev = -1;
    int next = -1;
    size_t begin = 0;
    size_t size = 0;
    bool frozen = false;  // a user-defined piece never merges further
  };
  std::vector<Symbol> symbols;
  for (size_t pos = 0; pos < text.size();) {
    Symbol s;
    s.begin = pos;
    for (const std::string& u : user_defined_) {
      if (!u.empty() && text.compare(pos, u.size(), u) == 0) {
        s.size = u.size();
        s.frozen = true;
        break;
      }
    }
    if (!s.frozen) {
      s.size = std::min(Utf8CharLength(static_cast<unsigned char>(text[pos])), text.size() - pos);
    }
    s.prev = static_cast<int>(symbols.size()) - 1;
    s.next = pos + s.size < text.size() ? static_cast<int>(symbols.size()) + 1 : -1;
    symbols.push_back(s);
    pos += s.size;
  }

  struct Candidate {
    float score;
    int left;
    int right;
    size_t size;
  };
  // Highest score first; on ties the leftmost pair, as sentencepiece's agenda orders them.
  const auto later = [](const Candidate& a, const Candidate& b) {
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  };
  std::priority_queue<Candidate, std::vector<Candidate>, decltype(later)> agenda(later);
  const auto consider = [&](int left, int right) {
    if (left < 0 || right < 0 || symbols[left].frozen || symbols[right].frozen) return;
    const size_t size = symbols[left].size + symbols[right].size;
    const auto it = mergeable_.find(text.substr(symbols[left].begin, size));
    if (it == mergeable_.end()) return;
    agenda.push({scores_[it->second], left, right, size});
  };
  for (size_t i = 1; i < symbols.size(); ++i)
    consider(static_cast<int>(i) - 1, static_cast<int>(i));

  while (!agenda.empty()) {
    const Candidate top = agenda.top();
    agenda.pop();
    Symbol& left = symbols[top.left];
    Symbol& right = symbols[top.right];
    // Stale: one side was merged away or grew since this pair was proposed.
    if (left.size == 0 || right.size == 0 || left.size + right.size != top.size) continue;
    left.size = top.size;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.left;
    right.size = 0;
    consider(left.prev, top.left);
    consider(top.left, left.next);
  }

  std::vector<int> ids;
  for (int i = symbols.empty() ? -1 : 0; i >= 0; i = symbols[i].next) {
    const std::string piece = text.substr(symbols[i].begin, symbols[i].size);
    const auto it = mergeable_.find(piece);
    if (it != mergeable_.end()) {
      ids.push_back(it->second);
      continue;
    }
    bool all_bytes = byte_fallback_;
    for (unsigned char c : piece) all_bytes = all_bytes && byte_ids_[c] >= 0;
    if (!all_bytes) {
      ids.push_back(unk_id_);
      continue;
    }
    for (unsigned char c : piece) ids.push_back(byte_ids_[c]);
  }
  return ids;
}

}  // namespace lorad::engine
