#include "clients/loradctl/json_output.h"

#include <google/protobuf/util/json_util.h>

#include <iostream>

#include "clients/loradctl/exit_codes.h"

namespace lorad::cli {

int PrintJson(const google::protobuf::Message& message, const std::string& what) {
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  std::string text;
  if (!google::protobuf::util::MessageToJsonString(message, &text, options).ok()) {
    std::cerr << "loradctl: cannot print " << what << " as JSON" << std::endl;
    return kExitError;
  }
  std::cout << text;
  return kExitOk;
}

}  // namespace lorad::cli
