// main() of every C++ test executable: fills in the paths tests read from the environment
// (LORAD_TINY_MODEL, LORAD_PARITY_DIR) with the values the build was configured with, unless the
// caller set them, so a test binary run by hand behaves as under ctest.
#include <gtest/gtest.h>

#include <cstdlib>

int main(int argc, char** argv) {
  setenv("LORAD_TINY_MODEL", LORAD_TINY_MODEL_DEFAULT, /*overwrite=*/0);
  setenv("LORAD_PARITY_DIR", LORAD_PARITY_DIR_DEFAULT, /*overwrite=*/0);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
