#include "engine/infer/generation_defaults.h"

#include <climits>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {
namespace {

using nlohmann::json;

constexpr int32_t kTransformersTopK = 50;  // GenerationConfig._get_default_generation_params

// The number at `key` (null or absent: nullopt); InvalidArgument naming the file and the key for
// anything else.
absl::StatusOr<std::optional<double>> ReadNumber(const json& j, const char* key,
                                                 const std::string& source) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return std::optional<double>();
  if (!it->is_number()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": field '", key, "' must be a number, got ", it->dump()));
  }
  return std::optional<double>(it->get<double>());
}

}  // namespace

absl::StatusOr<GenerationDefaults> GenerationDefaults::FromFile(const std::optional<json>& file,
                                                                const std::string& source) {
  GenerationDefaults d;
  if (!file.has_value()) return d;
  const json& j = *file;
  d.from_file = true;

  bool do_sample = false;
  if (auto it = j.find("do_sample"); it != j.end() && !it->is_null()) {
    if (!it->is_boolean()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": field 'do_sample' must be true or false, got ", it->dump()));
    }
    do_sample = it->get<bool>();
  }
  // Every field is read (and so type-checked) whether or not do_sample uses it.
  std::optional<double> temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens;
  const std::pair<const char*, std::optional<double>*> fields[] = {
      {"temperature", &temperature},
      {"top_k", &top_k},
      {"top_p", &top_p},
      {"min_p", &min_p},
      {"repetition_penalty", &repetition_penalty},
      {"max_new_tokens", &max_new_tokens}};
  for (const auto& [key, out] : fields) {
    absl::StatusOr<std::optional<double>> v = ReadNumber(j, key, source);
    if (!v.ok()) return v.status();
    *out = *v;
  }
  for (const auto& [key, v] :
       {std::pair{"top_k", top_k}, std::pair{"max_new_tokens", max_new_tokens}}) {
    if (v && !(*v >= 0 && *v <= INT32_MAX && *v == static_cast<double>(static_cast<int64_t>(*v)))) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": field '", key, "' must be a whole number >= 0, got ", *v));
    }
  }

  // A double beyond float's range becomes an infinity (the cast alone is undefined there), which
  // the sampler's ranges below then refuse, naming the field.
  const auto to_float = [](double v) {
    constexpr float kInf = std::numeric_limits<float>::infinity();
    if (std::abs(v) > std::numeric_limits<float>::max()) return v > 0 ? kInf : -kInf;
    return static_cast<float>(v);
  };
  SamplingParams& s = d.sampling;
  if (do_sample) {
    s.temperature = to_float(temperature.value_or(1.0));
    s.top_k = static_cast<int32_t>(top_k.value_or(kTransformersTopK));
    s.top_p = to_float(top_p.value_or(1.0));
    s.min_p = to_float(min_p.value_or(0.0));
  }
  s.repetition_penalty = to_float(repetition_penalty.value_or(1.0));
  if (max_new_tokens && *max_new_tokens >= 1)
    d.max_new_tokens = static_cast<int32_t>(*max_new_tokens);
  // The sampler's own ranges, with the file's field named instead of the request's
  // ("sampling.top_p: must be ..." -> "<file>: field 'top_p' must be ...").
  if (absl::Status st = s.Validate(INT32_MAX); !st.ok()) {
    absl::string_view message = st.message();
    absl::ConsumePrefix(&message, "sampling.");
    const size_t colon = message.find(':');
    return absl::InvalidArgumentError(colon == absl::string_view::npos
                                          ? absl::StrCat(source, ": ", message)
                                          : absl::StrCat(source, ": field '",
                                                         message.substr(0, colon), "'",
                                                         message.substr(colon + 1)));
  }
  return d;
}

std::string GenerationDefaults::Describe() const {
  const SamplingParams builtin;
  std::vector<std::string> parts;
  if (sampling.temperature != builtin.temperature) {
    parts.push_back(absl::StrCat("temperature ", sampling.temperature));
  }
  if (sampling.top_k != builtin.top_k) parts.push_back(absl::StrCat("top_k ", sampling.top_k));
  if (sampling.top_p != builtin.top_p) parts.push_back(absl::StrCat("top_p ", sampling.top_p));
  if (sampling.min_p != builtin.min_p) parts.push_back(absl::StrCat("min_p ", sampling.min_p));
  if (sampling.repetition_penalty != builtin.repetition_penalty) {
    parts.push_back(absl::StrCat("repetition_penalty ", sampling.repetition_penalty));
  }
  if (max_new_tokens) parts.push_back(absl::StrCat("max_new_tokens ", *max_new_tokens));
  if (sampling.temperature == 0) parts.insert(parts.begin(), "greedy");
  return absl::StrJoin(parts, ", ");
}

}  // namespace lorad::engine
