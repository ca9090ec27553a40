// The launchers of the CUDA epilogue kernels (stats_epilogue.cu, dz_epilogue.cu), as plain C++.
//
// csrc/epilogue_ops.cpp checks the arguments and calls these with raw pointers; nothing here
// needs a CUDA or ATen header, so the op registration compiles with the host compiler and nvcc
// only sees the kernels (which keeps the CUDA compile short: no ATen headers through nvcc).
// `stream` is the cudaStream_t to launch on. Launchers return after the launch (asynchronous);
// the caller checks cudaGetLastError (C10_CUDA_KERNEL_LAUNCH_CHECK).
#pragma once

#include <cstdint>

namespace papo_kernels::epilogue {

// Element types of the logits and dZ buffers.
enum class Dtype { kFloat32, kFloat16, kBFloat16 };

struct StatsLaunch {
  const void* z_a;  // [rows, vocab] raw logits h W^T (before / T), unit column stride
  const void* z_b;  // same for view b, or nullptr for one view
  int64_t ld_a, ld_b;  // row strides in elements
  Dtype dtype;         // of z_a and z_b
  int64_t rows, vocab;
  const void* targets;  // [rows] int64, or int32 when targets_int32
  bool targets_int32;
  int64_t ignore_index;
  float inv_t;  // 1 / temperature
  // [rows] float32 outputs in RowStats order; the view-b ones and the KLs only with z_b
  float* out[8];
};

struct DzLaunch {
  const void* z_a;  // [rows, vocab] raw logits (before / T), unit column stride
  const void* z_b;  // view b's logits, or nullptr when neither its dZ nor a KL gradient needs them
  int64_t ld_za, ld_zb;
  Dtype z_dtype;
  void* dz_a;  // [rows, vocab] outputs (may be z_a itself, for an fp32 in-place dZ), or nullptr
  void* dz_b;
  int64_t ld_dza, ld_dzb;
  Dtype dz_dtype;
  int64_t rows, vocab;
  const void* targets;
  bool targets_int32;
  int64_t ignore_index;
  float inv_t;
  unsigned terms;  // DzTerm flags (epilogue_math.h)
  // [rows] float32 saved statistics (view b's only with kLoadB) and upstream gradients (nullptr: 0)
  const float *lse_a, *entropy_a, *lse_b, *entropy_b, *kl_ab, *kl_ba;
  const float *g_logp_a, *g_entropy_a, *g_logp_b, *g_entropy_b, *g_kl_ab, *g_kl_ba;
};

void launch_stats_epilogue(const StatsLaunch& args, void* stream);
void launch_dz_epilogue(const DzLaunch& args, void* stream);

// The architectures the kernels were compiled for, e.g. "80,90" (nvcc's __CUDA_ARCH_LIST__).
const char* compiled_cuda_archs();

}  // namespace papo_kernels::epilogue
