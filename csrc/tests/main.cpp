// Entry point of mmcore_cpp_tests: runs the TEST_CASEs of every csrc/tests/*.cpp (see check.h).
// Usage: mmcore_cpp_tests [substring]   (runs only the tests whose name contains substring)
#include "check.h"

int main(int argc, char** argv) { return mmcore::testing::run_all(argc, argv); }
