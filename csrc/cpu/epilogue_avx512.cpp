// The row epilogues with at::vec's AVX512 Vectorized<float> (16 lanes, Sleef exp).
//
// The build compiles this file with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c
// on x86-64 (setup.py, CMakeLists.txt: files named *_avx512.cpp); without those flags it defines
// no kernels and the dispatcher skips AVX512.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512

#include "epilogue_kernels.h"

namespace papo_kernels::cpu {

const EpilogueKernels* epilogue_kernels_AVX512() { return AVX512::kernel_table(); }

}  // namespace papo_kernels::cpu
#else
#include "epilogue.h"

namespace papo_kernels::cpu {

const EpilogueKernels* epilogue_kernels_AVX512() { return nullptr; }

}  // namespace papo_kernels::cpu
#endif
