// BenchArgs: the engine benchmarks' command line, "--key=value" pairs with defaults. Benchmarks
// are tools, not the daemon: no flags library, unknown keys are an error so a typo in the device
// script fails loudly instead of measuring the wrong thing.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace lorad::bench {

class BenchArgs {
 public:
  // `known` lists every accepted key with its default value.
  BenchArgs(int argc, char** argv, std::map<std::string, std::string> known)
      : values_(std::move(known)) {
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      const size_t eq = arg.find('=');
      if (arg.rfind("--", 0) != 0 || eq == std::string::npos) Die("expected --key=value: " + arg);
      const std::string key = arg.substr(2, eq - 2);
      if (!values_.count(key)) Die("unknown flag --" + key);
      values_[key] = arg.substr(eq + 1);
    }
  }

  const std::string& Get(const std::string& key) const { return values_.at(key); }
  int64_t Int(const std::string& key) const { return std::stoll(Get(key)); }
  double Double(const std::string& key) const { return std::stod(Get(key)); }
  std::vector<int64_t> IntList(const std::string& key) const {
    std::vector<int64_t> out;
    std::stringstream in(Get(key));
    for (std::string item; std::getline(in, item, ',');) out.push_back(std::stoll(item));
    return out;
  }

 private:
  [[noreturn]] static void Die(const std::string& message) {
    std::fprintf(stderr, "%s\n", message.c_str());
    std::exit(2);
  }
  std::map<std::string, std::string> values_;
};

}  // namespace lorad::bench
