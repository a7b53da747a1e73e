// `loradctl generate` and `loradctl chat`: stream completions to stdout as tokens arrive.
// Each function runs one command and returns the process exit code (exit_codes.h).
#pragma once

#include <cstdint>
#include <istream>
#include <optional>
#include <string>
#include <vector>

#include "clients/loradctl/connection.h"

namespace lorad::cli {

// Sampling flags; an unset value leaves the daemon's default in place.
struct SamplingOptions {
  std::optional<int32_t> max_new_tokens;
  std::optional<double> temperature;  // 0 = greedy
  std::optional<int32_t> top_k;
  std::optional<double> top_p;
  std::optional<double> min_p;
  std::optional<double> repetition_penalty;
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;  // stop strings
};

struct GenerationOptions {
  std::string adapter;  // empty = the base model
  SamplingOptions sampling;
  bool show_usage = false;  // token counts and timings on stderr after each reply
};

// `text` for a terminal: control characters other than a line break and a tab (ESC, CR, BEL, DEL
// and the C1 range U+0080..U+009F) written as \xNN / \uNNNN, so that a reply cannot retitle the
// window, clear the screen or hide text with escape sequences. Output to a pipe keeps the bytes.
std::string ForTerminal(const std::string& text);

// `prompt` "-" reads the whole prompt from `in`.
int RunGenerate(Connection& connection, const GenerationOptions& options, std::string prompt,
                std::istream& in);

struct ChatOptions {
  GenerationOptions generation;
  std::string template_name;  // empty = the model's own chat template
  std::string system;         // optional system message, first in the conversation
  // Optional start of every reply, which the model continues (ChatRequest's
  // continue_final_message): "{" for JSON, "Sure," for an answer.
  std::string prefill;
};

// Reads one user message per line from `in` until end of input or `/exit`, streaming each
// reply and keeping the whole conversation; `/reset` starts over. Prompts only on a terminal.
int RunChat(Connection& connection, const ChatOptions& options, std::istream& in);

}  // namespace lorad::cli
