// ExampleFormatter against tests/parity/reference_trainer_format.py: transformers' tokenizer and
// the model's Jinja chat template, with the formatting rules written out in Python.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>

#include "engine/model/tokenizer.h"
#include "engine/train/dataset_reader.h"
#include "engine/train/example_formatter.h"
#include "nlohmann/json.hpp"

namespace lorad::engine {
namespace {

TEST(TrainerFormatParity, TokenIdsAndLabelsEqualTheReference) {
  const std::string model = std::getenv("LORAD_TINY_MODEL");
  const std::string path =
      std::string(std::getenv("LORAD_PARITY_DIR")) + "/trainer_format/formatting.json";
  std::ifstream in(path);
  ASSERT_TRUE(in) << "missing reference " << path;
  const auto cases = nlohmann::json::parse(in);
  ASSERT_EQ(cases.size(), 8u);
  auto tokenizer = LoadTokenizer(model);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  for (const auto& c : cases) {
    SCOPED_TRACE(c["name"].get<std::string>());
    ExampleFormatterOptions options;
    options.template_name = c["template"].get<std::string>();
    options.response_only = c["response_only"].get<bool>();
    options.max_seq_length = c["max_seq_length"].get<int64_t>();
    auto formatter = ExampleFormatter::Create(**tokenizer, model, options);
    ASSERT_TRUE(formatter.ok()) << formatter.status();
    auto examples = ReadDataset(c["file"].get<std::string>());
    ASSERT_TRUE(examples.ok()) << examples.status();
    ASSERT_EQ(examples->size(), c["input_ids"].size());
    int64_t masked = 0;
    for (size_t i = 0; i < examples->size(); ++i) {
      auto t = formatter->Format((*examples)[i]);
      ASSERT_TRUE(t.ok()) << t.status();
      EXPECT_EQ(t->input_ids, c["input_ids"][i].get<std::vector<int32_t>>()) << "record " << i;
      EXPECT_EQ(t->labels, c["labels"][i].get<std::vector<int32_t>>()) << "record " << i;
      for (int32_t l : t->labels) masked += l == kNotTrained;
      EXPECT_LE(static_cast<int64_t>(t->input_ids.size()), options.max_seq_length);
    }
    // Response-only cases really mask something (text records train every token); all-token
    // cases mask nothing.
    if (options.response_only && c["name"] != "text_bos_written_out") {
      EXPECT_GT(masked, 0);
    } else {
      EXPECT_EQ(masked, 0);
    }
  }
}

}  // namespace
}  // namespace lorad::engine
