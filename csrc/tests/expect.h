// The ctest executables' check counter: each failed check prints what failed and counts, so one
// run reports every failure (not just the first) and the exit status says whether any failed.
#pragma once

#include <cstdio>
#include <string>

namespace papo_kernels_test {

inline int failures = 0;
inline int checks = 0;

inline void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

}  // namespace papo_kernels_test
