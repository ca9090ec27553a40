// Picks the row epilogues (epilogue.h) compiled for this CPU's capability.
#include "epilogue.h"

#include <ATen/Version.h>

#include <limits>
#include <string>

namespace papo_kernels::cpu {

void reset_states(RowState* states, int64_t count) {
  const ViewState empty{-std::numeric_limits<float>::infinity(), 0.0, 0.0, 0.0, 0.0f};
  for (int64_t i = 0; i < count; ++i) states[i] = RowState{empty, empty};
}

const EpilogueKernels& epilogue_kernels() {
  // ATen's choice (cpuinfo, overridable with ATEN_CPU_CAPABILITY=default|avx2|avx512), so the
  // extension and ATen's own kernels use the same instruction set.
  static const EpilogueKernels* chosen = [] {
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512" && epilogue_kernels_AVX512() != nullptr) return epilogue_kernels_AVX512();
    if ((capability == "AVX512" || capability == "AVX2") && epilogue_kernels_AVX2() != nullptr) {
      return epilogue_kernels_AVX2();
    }
    return epilogue_kernels_DEFAULT();
  }();
  return *chosen;
}

}  // namespace papo_kernels::cpu
