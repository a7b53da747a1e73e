#include "clients/loradctl/generation_commands.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <iostream>
#include <iterator>

#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "clients/loradctl/enum_names.h"
#include "clients/loradctl/exit_codes.h"
#include "clients/loradctl/utf8_fields.h"

namespace lorad::cli {

namespace {

lorad::v1::SamplingParams ToSamplingParams(const SamplingOptions& options) {
  lorad::v1::SamplingParams params;
  if (options.max_new_tokens) params.set_max_new_tokens(*options.max_new_tokens);
  if (options.temperature) params.set_temperature(*options.temperature);
  if (options.top_k) params.set_top_k(*options.top_k);
  if (options.top_p) params.set_top_p(*options.top_p);
  if (options.min_p) params.set_min_p(*options.min_p);
  if (options.repetition_penalty) params.set_repetition_penalty(*options.repetition_penalty);
  if (options.seed) params.set_seed(*options.seed);
  for (const std::string& stop : options.stop) params.add_stop(stop);
  return params;
}

}  // namespace

std::string ForTerminal(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if ((c < 0x20 && c != '\n' && c != '\t') || c == 0x7f) {
      out += absl::StrFormat("\\x%02x", c);
    } else if (c == 0xc2 && i + 1 < text.size() &&
               static_cast<unsigned char>(text[i + 1]) >= 0x80 &&
               static_cast<unsigned char>(text[i + 1]) <= 0x9f) {  // C1: U+0080..U+009F
      out += absl::StrFormat("\\u%04x", static_cast<unsigned char>(text[i + 1]));
      ++i;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

namespace {

// Copies a reply stream to stdout as it arrives and appends its text to `reply`. On a terminal
// the text's control characters are shown, not obeyed (ForTerminal). Output that cannot be
// written (a full disk, a closed pipe whose SIGPIPE is ignored) cancels the request.
// `reply` may hold a prefilled start, shown first.
int StreamReply(Connection& connection, grpc::ClientContext& context,
                grpc::ClientReaderInterface<lorad::v1::GenerateChunk>& reader, bool show_usage,
                std::string* reply) {
  const bool terminal = isatty(STDOUT_FILENO) != 0;
  std::cout << (terminal ? ForTerminal(*reply) : *reply);
  lorad::v1::GenerateChunk chunk;
  lorad::v1::GenerateChunk last;
  bool answered = false;
  while (reader.Read(&chunk)) {
    answered = true;
    std::cout << (terminal ? ForTerminal(chunk.text()) : chunk.text()) << std::flush;
    if (!std::cout) {
      const int err = errno;
      context.TryCancel();
      (void)reader.Finish();
      std::cerr << "loradctl: cannot write the output (" << std::strerror(err)
                << "); the request was cancelled" << std::endl;
      return kExitError;
    }
    reply->append(chunk.text());
    if (chunk.finish_reason() != lorad::v1::FINISH_REASON_UNSPECIFIED) last = chunk;
  }
  // The reply never has to end in a newline; the terminal prompt (or next line) should. An empty
  // reply (an end of sequence first) is an empty line: piped, each turn of a chat ends its own.
  if (reply->empty() || reply->back() != '\n') std::cout << std::endl;
  if (grpc::Status status = reader.Finish(); !status.ok()) {
    return connection.Fail(status, answered);
  }
  if (last.finish_reason() == lorad::v1::FINISH_REASON_ERROR) {
    std::cerr << "loradctl: generation failed: " << last.error() << std::endl;
    return kExitError;
  }
  if (show_usage) {
    const auto& u = last.usage();
    const auto* reason =
        lorad::v1::FinishReason_descriptor()->FindValueByNumber(last.finish_reason());
    std::cerr << absl::StrFormat(
                     "[%d prompt + %d completion tokens, first token %.3fs, total %.3fs, %s]",
                     u.prompt_tokens(), u.completion_tokens(), u.time_to_first_token_seconds(),
                     u.total_seconds(), reason != nullptr ? EnumShortName(reason) : "?")
              << std::endl;
  }
  return kExitOk;
}

}  // namespace

int RunGenerate(Connection& connection, const GenerationOptions& options, std::string prompt,
                std::istream& in) {
  if (prompt == "-") {
    prompt.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  lorad::v1::GenerateRequest request;
  request.set_prompt(prompt);
  request.set_adapter(options.adapter);
  *request.mutable_sampling() = ToSamplingParams(options.sampling);
  if (ReportInvalidUtf8(request)) return kExitUsage;
  auto context = connection.NewContext(CallKind::kStream);
  auto reader = connection.inference().Generate(context.get(), request);
  std::string reply;
  return StreamReply(connection, *context, *reader, options.show_usage, &reply);
}

int RunChat(Connection& connection, const ChatOptions& options, std::istream& in) {
  lorad::v1::ChatRequest request;
  request.set_adapter(options.generation.adapter);
  request.set_template_(options.template_name);
  *request.mutable_sampling() = ToSamplingParams(options.generation.sampling);
  auto start_conversation = [&] {
    request.clear_messages();
    if (!options.system.empty()) {
      auto* system = request.add_messages();
      system->set_role("system");
      system->set_content(options.system);
    }
  };
  start_conversation();
  // The system message, stops, the adapter; then the prefill, sent with every turn.
  if (ReportInvalidUtf8(request)) return kExitUsage;
  lorad::v1::ChatMessage prefill;
  prefill.set_role("assistant");
  prefill.set_content(options.prefill);
  if (ReportInvalidUtf8(prefill)) return kExitUsage;
  const bool terminal = isatty(STDIN_FILENO) != 0 && &in == &std::cin;
  if (terminal) std::cerr << "(one message per line; /reset starts over, /exit or Ctrl-D quits)\n";
  std::string line;
  while (true) {
    // The prompt goes to stderr (as bash's `read -p`): `loradctl chat > file` keeps only replies.
    if (terminal) {
      std::cout << std::flush;
      std::cerr << "> " << std::flush;
    }
    if (!std::getline(in, line)) break;
    const std::string text(absl::StripAsciiWhitespace(line));
    if (text.empty()) continue;
    if (text == "/exit" || text == "/quit") break;
    if (text == "/reset") {
      start_conversation();
      continue;
    }
    lorad::v1::ChatMessage message;
    message.set_role("user");
    message.set_content(text);
    // On a terminal that line is not sent and the conversation goes on; piped, a script learns
    // from the exit code (as `generate -` with the same input).
    if (ReportInvalidUtf8(message)) {
      if (!terminal) return kExitUsage;
      continue;
    }
    *request.add_messages() = std::move(message);
    const bool prefilled = !options.prefill.empty();
    if (prefilled) *request.add_messages() = prefill;
    request.set_continue_final_message(prefilled);
    auto context = connection.NewContext(CallKind::kStream);
    auto reader = connection.inference().Chat(context.get(), request);
    std::string reply = options.prefill;
    if (int code =
            StreamReply(connection, *context, *reader, options.generation.show_usage, &reply);
        code != kExitOk) {
      // On a terminal the conversation goes on without that message (a full context, a busy
      // server: shorten it, try again or /reset); piped, a script learns from the exit code.
      // Output that cannot be written ends it either way.
      if (!terminal || !std::cout) return code;
      if (prefilled) request.mutable_messages()->RemoveLast();
      request.mutable_messages()->RemoveLast();
      std::cerr << "loradctl: that message was not added to the conversation (/reset starts over, "
                   "/exit quits)"
                << std::endl;
      continue;
    }
    // The reply, prefill and all, as the conversation's next message (the prefill's own, if any).
    if (!prefilled) request.add_messages()->set_role("assistant");
    request.mutable_messages()->rbegin()->set_content(reply);
  }
  if (terminal) std::cout << std::endl;
  return kExitOk;
}

}  // namespace lorad::cli
