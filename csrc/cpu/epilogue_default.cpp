// The row epilogues with at::vec's portable Vectorized<float> (any CPU; on x86 without AVX2).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT

#include "epilogue_kernels.h"

namespace papo_kernels::cpu {

const EpilogueKernels* epilogue_kernels_DEFAULT() { return DEFAULT::kernel_table(); }

}  // namespace papo_kernels::cpu
