// The row epilogues with at::vec's AVX2 Vectorized<float> (8 lanes, Sleef exp).
//
// The build compiles this file with -mavx2 -mfma -mf16c on x86-64 (setup.py, CMakeLists.txt: files
// named *_avx2.cpp); without those flags it defines no kernels and the dispatcher skips AVX2.
#if defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2

#include "epilogue_kernels.h"

namespace papo_kernels::cpu {

const EpilogueKernels* epilogue_kernels_AVX2() { return AVX2::kernel_table(); }

}  // namespace papo_kernels::cpu
#else
#include "epilogue.h"

namespace papo_kernels::cpu {

const EpilogueKernels* epilogue_kernels_AVX2() { return nullptr; }

}  // namespace papo_kernels::cpu
#endif
