// Row epilogues of the CPU kernels: what happens to a block of logits after its GEMM.
//
// The GEMMs (ATen/BLAS) produce raw products Z = h w^T; every epilogue reads them as
// z = Z / T (multiplied by inv_t = 1/T) and works row by row in fp32, with the cross-tile sums in
// fp64 (docs/design.md "Kernel math"):
//
//   fold    streams a tile of columns [col0, col0 + width) of each row into its running
//           statistics: max m, S = sum e^(z-m), U' = sum e^(z-m)(z-m) (shifted), and for two views
//           X_ab = sum e^(z_a-m_a)(z_a-z_b), X_ba = sum e^(z_b-m_b)(z_b-z_a), plus the target logit;
//   finish  turns the running statistics into logp, entropy, lse and the two KLs:
//              lse = m + log S, logp = z_y - lse, H = log S - U'/S,
//              KL_ab = X_ab/S_a - ((m_a - m_b) + log S_a - log S_b)   (mirrored for KL_ba);
//   dz      writes dZ (already divided by T) for a tile from the saved statistics and the upstream
//           per-row gradients g_*:
//              dZ_a = g_lpa (onehot - p_a) - g_ha p_a (log p_a + H_a)
//                     + g_kab p_a (log p_a - log p_b - KL_ab) + g_kba (p_a - p_b)   (dZ_b mirrored).
//
// Rows whose target is ignore_index are skipped: their outputs and dZ rows are exactly 0. Rows
// whose target lies outside [0, V) give NaN outputs and NaN dZ rows (so dh and dW turn NaN, as
// in the torch backend). Only the columns of a tile are read: the vocabulary tail beyond V never
// enters a sum.
//
// The implementation (epilogue_kernels.h) uses at::vec and is compiled once per CPU capability
// (epilogue_default.cpp, epilogue_avx2.cpp, epilogue_avx512.cpp); `epilogue_kernels()` returns
// the table of the capability ATen itself selected on this CPU (ATEN_CPU_CAPABILITY overrides it).
// This header is plain C++ so that the capability files include nothing else from the extension.
#pragma once

#include <cstdint>

namespace papo_kernels::cpu {

// Running statistics of one row and view over the columns folded so far.
struct ViewState {
  float m;         // running max of z; -inf before the first column
  double s;        // sum e^(z - m)
  double u;        // sum e^(z - m) (z - m)
  double x;        // sum e^(z - m) (z - z_other)  (two views only)
  float z_target;  // z at the target column (valid once that column was folded)
};

struct RowState {
  ViewState a;
  ViewState b;
};

// Resets `count` states before the first fold.
void reset_states(RowState* states, int64_t count);

struct FoldArgs {
  const float* za;  // [rows, ld_z] raw products of view a for this tile
  const float* zb;  // same for view b, or nullptr for one view
  int64_t ld_z;     // row stride of za / zb
  int64_t width;    // columns in the tile
  int64_t col0;     // vocabulary index of the tile's first column
  const int64_t* targets;  // [rows]
  int64_t ignore_index;
  int64_t vocab;
  float inv_t;
  RowState* states;  // [rows]
};

struct FinishArgs {
  const RowState* states;  // [rows]
  const int64_t* targets;  // [rows]
  int64_t ignore_index;
  int64_t vocab;
  bool two_views;
  // [rows] outputs; the view-b ones and the KLs are only written with two views
  float* logp_a;
  float* entropy_a;
  float* lse_a;
  float* logp_b;
  float* entropy_b;
  float* lse_b;
  float* kl_ab;
  float* kl_ba;
};

struct DzArgs {
  const float* za;  // [rows, ld_z] raw products of view a
  const float* zb;  // view b, or nullptr when neither its dZ nor a KL gradient is needed
  int64_t ld_z;
  float* dza;  // [rows, ld_dz] output, may alias za; nullptr when not needed
  float* dzb;  // may alias zb; nullptr when not needed
  int64_t ld_dz;
  int64_t width;
  int64_t col0;
  const int64_t* targets;
  int64_t ignore_index;
  int64_t vocab;
  float inv_t;
  // saved statistics [rows] (view-b ones only with zb)
  const float* lse_a;
  const float* entropy_a;
  const float* lse_b;
  const float* entropy_b;
  const float* kl_ab;
  const float* kl_ba;
  // upstream gradients [rows]; nullptr means zero
  const float* g_logp_a;
  const float* g_entropy_a;
  const float* g_logp_b;
  const float* g_entropy_b;
  const float* g_kl_ab;
  const float* g_kl_ba;
};

// One capability's implementation; each function handles rows [r0, r1) of its arguments.
struct EpilogueKernels {
  const char* capability;
  void (*fold)(const FoldArgs&, int64_t r0, int64_t r1);
  void (*finish)(const FinishArgs&, int64_t r0, int64_t r1);
  void (*dz)(const DzArgs&, int64_t r0, int64_t r1);
};

// The tables compiled into this build (nullptr where a capability was not compiled).
const EpilogueKernels* epilogue_kernels_DEFAULT();
const EpilogueKernels* epilogue_kernels_AVX2();
const EpilogueKernels* epilogue_kernels_AVX512();

// The table for this CPU: ATen's selected capability, falling back to the best compiled below it.
const EpilogueKernels& epilogue_kernels();

}  // namespace papo_kernels::cpu
