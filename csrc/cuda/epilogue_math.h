// The workspace path's epilogue math, written once for the CUDA kernels and their host reference.
//
// The Triton workspace path (papo_kernels/kernels/workspace.py) computes the logits of a chunk of
// C rows, Z = [h_a; h_b] W^T, into an fp32 workspace; two epilogues then read it (docs/design.md
// "Kernel math"; z = Z / T, p = softmax(z), y the target):
//
//   statistics  per row: max m, S = sum e^(z-m), U' = sum e^(z-m)(z-m), for two views
//               X_ab = sum e^(z_a-m_a)(z_a-z_b) and X_ba mirrored, the target logit z_y; then
//                 lse = m + log S, logp = z_y - lse, H = log S - U'/S,
//                 KL_ab = X_ab/S_a - ((m_a - m_b) + log S_a - log S_b),  KL_ba mirrored
//   dZ          per element, from the saved statistics and the upstream per-row gradients g_*:
//                 dZ_a = g_lpa (onehot - p_a) - g_ha p_a (log p_a + H_a)
//                        + g_kab p_a (log p_a - log p_b - KL_ab) + g_kba (p_a - p_b)
//                 dZ_b = g_lpb (onehot - p_b) - g_hb p_b (log p_b + H_b)
//                        + g_kab (p_b - p_a) + g_kba p_b (log p_b - log p_a - KL_ba)
//               all divided by T.
//
// Numerical rules (as papo_kernels/kernels/_math.py): every value is fp32 whatever the logits'
// dtype; only columns inside V are read (the vocabulary tail never enters a sum); the -1 of
// (onehot - p) is folded in fp32; rows whose target is ignore_index give exactly 0 in every
// statistic and every dZ element; rows whose target lies outside [0, V) give NaN.
//
// Everything here is `__host__ __device__` (PAPO_HD): the CUDA kernels (stats_epilogue.cu,
// dz_epilogue.cu) call these functions per thread, and the host reference of those kernels (the
// CPU registration in csrc/epilogue_ops.cpp, and csrc/tests/test_epilogue_math.cpp under ctest)
// calls the same functions with the same per-thread column assignment and the same reduction
// tree. A CPU machine can therefore check the kernels' arithmetic and decomposition against a
// float64 loop; what it cannot check (the shuffles, the vector loads, the launch) the gpu tests
// check (tests/test_cuda_epilogue.py). On the device exp is __expf (ex2.approx after a multiply
// by log2 e, what Triton's tl.exp compiles to), on the host std::exp.
#pragma once

#include <math.h>

#include <cstdint>

#if defined(__CUDACC__)
#define PAPO_HD __host__ __device__ __forceinline__
#else
#define PAPO_HD inline
#endif

namespace papo_kernels::epilogue {

// ---------------------------------------------------------------- geometry of the kernels

// Statistics: one block of kStatsThreads threads per row (both views' rows for two views). Why a
// block per row and not a warp: a chunk has a few hundred rows (384 per view at the 7B head's
// 512 MiB workspace) of V = 152,064 columns (594 KB of fp32 each). 384 blocks of 8 warps are all
// resident at once on a 132-SM H100/H200 (4 blocks per SM at <= 64 registers) and keep ~6 MB of
// loads in flight, twice HBM's bandwidth-latency product, so a single pass runs at bandwidth with
// no split-vocabulary partials and no second (combine) kernel. A warp per row would leave 384
// warps (3 per SM) with ~0.2 MB in flight: latency-bound.
constexpr int kWarpSize = 32;
constexpr int kStatsThreads = 256;
constexpr int kStatsWarps = kStatsThreads / kWarpSize;
// __launch_bounds__' minimum resident blocks: caps the registers at 64 per thread so that the
// chunk's 384 row blocks fit in one wave on 132 SMs.
constexpr int kStatsBlocksPerSm = 4;
// Vectors each statistics thread loads before folding them: two 16-byte loads per view in flight.
constexpr int kStatsLoadBatch = 2;
// dZ: elementwise, a 2-D grid of (column spans, rows); each thread converts kDzColumns columns
// per row (two fp32 vectors or one half vector: <= 64 registers either way).
constexpr int kDzThreads = 256;
constexpr int kDzColumns = 8;
// Vector loads are 16 bytes: 4 fp32 or 8 fp16/bf16 logits per load.
constexpr int kVectorBytes = 16;

// Whether rows starting at `ptr` with a row stride of `row_stride` elements of `elem_bytes` bytes
// can be read with loads of `vec_bytes` bytes (every row start aligned); a null pointer (an absent
// view) never prevents it.
PAPO_HD bool rows_aligned(const void* ptr, int64_t row_stride, int64_t elem_bytes, int64_t vec_bytes) {
  if (ptr == nullptr) return true;
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(vec_bytes) == 0 &&
         (row_stride * elem_bytes) % vec_bytes == 0;
}

PAPO_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return ::expf(x);
#endif
}

PAPO_HD float neg_inf() { return -INFINITY; }
PAPO_HD float quiet_nan() { return NAN; }

// ---------------------------------------------------------------- rows: ignored, invalid, valid

enum class RowKind { kValid, kIgnored, kBadTarget };

PAPO_HD RowKind row_kind(int64_t target, int64_t ignore_index, int64_t vocab) {
  if (target == ignore_index) return RowKind::kIgnored;
  if (target < 0 || target >= vocab) return RowKind::kBadTarget;
  return RowKind::kValid;
}

// ---------------------------------------------------------------- statistics

// One view's running sums over the columns folded so far, relative to the running max m.
struct ViewSums {
  float m;  // max of z; -inf before the first column
  float s;  // sum e^(z - m); 0 exactly when no column was folded (else >= 1, or NaN)
  float u;  // sum e^(z - m) (z - m)
};

struct RowSums {
  ViewSums a, b;
  float x_ab;  // sum e^(z_a - m_a) (z_a - z_b), relative to m_a
  float x_ba;  // sum e^(z_b - m_b) (z_b - z_a), relative to m_b
};

PAPO_HD RowSums empty_sums() {
  RowSums r;
  r.a = ViewSums{neg_inf(), 0.f, 0.f};
  r.b = ViewSums{neg_inf(), 0.f, 0.f};
  r.x_ab = 0.f;
  r.x_ba = 0.f;
  return r;
}

// Moves a view's sums (and its KL sum x) to a new max m_new > m:
// U' <- e^(m - m_new) (U' + (m - m_new) S), guarding 0 * -inf before the first column.
PAPO_HD void raise_max(ViewSums& v, float& x, float m_new) {
  const float shift = v.m - m_new;
  const float scale = fast_exp(shift);
  v.u = scale * (v.u + (v.s > 0.f ? shift * v.s : 0.f));
  v.s *= scale;
  x *= scale;
  v.m = m_new;
}

// Folds N columns (z already divided by T) into the sums: the max once per group, then one exp
// per element and view. A NaN logit makes its e, hence S and every statistic, NaN.
template <int N>
PAPO_HD void fold(RowSums& r, const float (&za)[N], const float (&zb)[N], bool two) {
  float ma = za[0];
#pragma unroll
  for (int i = 1; i < N; ++i) ma = fmaxf(ma, za[i]);
  if (ma > r.a.m) raise_max(r.a, r.x_ab, ma);
  if (two) {
    float mb = zb[0];
#pragma unroll
    for (int i = 1; i < N; ++i) mb = fmaxf(mb, zb[i]);
    if (mb > r.b.m) raise_max(r.b, r.x_ba, mb);
  }
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float ca = za[i] - r.a.m;
    const float ea = fast_exp(ca);
    r.a.s += ea;
    r.a.u += ea * ca;
    if (two) {
      const float cb = zb[i] - r.b.m;
      const float eb = fast_exp(cb);
      const float diff = za[i] - zb[i];
      r.b.s += eb;
      r.b.u += eb * cb;
      r.x_ab += ea * diff;
      r.x_ba -= eb * diff;
    }
  }
}

// Merges the sums `o` of other columns into `v` (x, ox: the KL sums kept against each one's max).
PAPO_HD void merge_view(ViewSums& v, float& x, const ViewSums& o, float ox) {
  if (o.s == 0.f) return;  // no columns on that side
  if (v.s == 0.f) {
    v = o;
    x = ox;
    return;
  }
  const float m = fmaxf(v.m, o.m);
  const float sv = fast_exp(v.m - m);
  const float so = fast_exp(o.m - m);
  v.u = sv * (v.u + (v.m - m) * v.s) + so * (o.u + (o.m - m) * o.s);
  v.s = sv * v.s + so * o.s;
  x = sv * x + so * ox;
  v.m = m;
}

PAPO_HD void merge(RowSums& r, const RowSums& o, bool two) {
  merge_view(r.a, r.x_ab, o.a, o.x_ab);
  if (two) merge_view(r.b, r.x_ba, o.b, o.x_ba);
}

// The columns one statistics thread folds, in the kernel's order: 16-byte vectors tid,
// tid + kStatsThreads, ... (consecutive threads read consecutive vectors: coalesced), loaded
// kStatsLoadBatch at a time, then the < VEC columns after the last whole vector one by one; without
// aligned rows (`vectorized` false) every column one by one. `load.vec(col, a, b)` fills VEC
// values of z (already / T) from column col, `load.one(col, a, b)` one value.
template <int VEC, typename Load>
PAPO_HD void fold_thread_columns(RowSums& r, const Load& load, int64_t vocab, int tid, bool vectorized, bool two) {
  int64_t scalar_from = 0;
  if (vectorized) {
    const int64_t vectors = vocab / VEC;
    for (int64_t v0 = tid; v0 < vectors; v0 += int64_t{kStatsLoadBatch} * kStatsThreads) {
      float a[kStatsLoadBatch][VEC], b[kStatsLoadBatch][VEC] = {};  // b: read with two views only
#pragma unroll
      for (int k = 0; k < kStatsLoadBatch; ++k) {
        const int64_t v = v0 + int64_t{k} * kStatsThreads;
        if (v < vectors) load.vec(v * VEC, a[k], b[k]);
      }
#pragma unroll
      for (int k = 0; k < kStatsLoadBatch; ++k) {
        if (v0 + int64_t{k} * kStatsThreads < vectors) fold<VEC>(r, a[k], b[k], two);
      }
    }
    scalar_from = vectors * VEC;
  }
  for (int64_t col = scalar_from + tid; col < vocab; col += kStatsThreads) {
    float a[1], b[1] = {0.f};
    load.one(col, a[0], b[0]);
    fold<1>(r, a, b, two);
  }
}

// The block reduction of the statistics kernel, replayed on the host: stats_epilogue.cu merges
// with __shfl_xor_sync butterflies (offsets 16, 8, 4, 2, 1 within each warp; lane 0 of each warp
// then hands its total to warp 0, whose lanes >= kStatsWarps hold empty sums, for a second
// butterfly from kStatsWarps / 2), every lane merging its partner's sums into its own. Here the
// same merges run in the same order on an array of lanes, so the host result is the value the
// kernel's thread 0 ends with (up to exp's last bits).
inline void butterfly_reference(RowSums (&lanes)[kWarpSize], int first_offset, bool two) {
  for (int offset = first_offset; offset >= 1; offset /= 2) {
    RowSums before[kWarpSize];
    for (int l = 0; l < kWarpSize; ++l) before[l] = lanes[l];
    for (int l = 0; l < kWarpSize; ++l) merge(lanes[l], before[l ^ offset], two);
  }
}

// The sums thread 0 of the statistics kernel holds for one row after the block reduction.
template <int VEC, typename Load>
RowSums row_sums_reference(const Load& load, int64_t vocab, bool vectorized, bool two) {
  RowSums warp_totals[kStatsWarps];
  for (int w = 0; w < kStatsWarps; ++w) {
    RowSums lanes[kWarpSize];
    for (int l = 0; l < kWarpSize; ++l) {
      lanes[l] = empty_sums();
      fold_thread_columns<VEC>(lanes[l], load, vocab, w * kWarpSize + l, vectorized, two);
    }
    butterfly_reference(lanes, kWarpSize / 2, two);
    warp_totals[w] = lanes[0];
  }
  RowSums lanes[kWarpSize];
  for (int l = 0; l < kWarpSize; ++l) lanes[l] = l < kStatsWarps ? warp_totals[l] : empty_sums();
  butterfly_reference(lanes, kStatsWarps / 2, two);
  return lanes[0];
}

// One row's outputs, in RowStats order (the view-b ones only meaningful with two views).
struct RowStatsOut {
  float logp_a, entropy_a, lse_a, logp_b, entropy_b, lse_b, kl_ab, kl_ba;
};

PAPO_HD RowStatsOut fill_stats(float value) {
  return RowStatsOut{value, value, value, value, value, value, value, value};
}

// Finishes a valid row from its merged sums and target logits (z_y, already / T).
PAPO_HD RowStatsOut finish_row(const RowSums& r, float zy_a, float zy_b, bool two) {
  RowStatsOut o = fill_stats(0.f);
  const float log_s_a = logf(r.a.s);
  o.lse_a = r.a.m + log_s_a;
  o.logp_a = zy_a - o.lse_a;
  o.entropy_a = log_s_a - r.a.u / r.a.s;
  if (two) {
    const float log_s_b = logf(r.b.s);
    o.lse_b = r.b.m + log_s_b;
    o.logp_b = zy_b - o.lse_b;
    o.entropy_b = log_s_b - r.b.u / r.b.s;
    // the lse difference from the two maxima and log-sums: its absolute error stays near 1e-6
    const float dlse = (r.a.m - r.b.m) + (log_s_a - log_s_b);
    o.kl_ab = r.x_ab / r.a.s - dlse;
    o.kl_ba = r.x_ba / r.b.s + dlse;
  }
  return o;
}

// ---------------------------------------------------------------- dZ

// Which terms of dZ a call has: an absent upstream gradient is zero and its terms are skipped.
enum DzTerm : unsigned {
  kGradLogpA = 1u << 0,
  kGradEntropyA = 1u << 1,
  kGradLogpB = 1u << 2,
  kGradEntropyB = 1u << 3,
  kGradKlAB = 1u << 4,
  kGradKlBA = 1u << 5,
  kNeedDzA = 1u << 6,
  kNeedDzB = 1u << 7,
  kLoadB = 1u << 8,  // view b's logits are read (its dZ or either KL's gradient needs them)
};

// One valid row's coefficients: saved statistics and upstream gradients (0 where absent).
struct DzRow {
  float lse_a, entropy_a, lse_b, entropy_b, kl_ab, kl_ba;
  float g_logp_a, g_entropy_a, g_logp_b, g_entropy_b, g_kl_ab, g_kl_ba;
};

// dZ of one column (za, zb already / T; is_target: this column is the row's target), divided by T.
PAPO_HD void dz_element(const DzRow& c, unsigned terms, float inv_t, float za, float zb, bool is_target, float& dza,
                        float& dzb) {
  // log p and p from the saved lse: no second reduction over the vocabulary
  const float lp_a = za - c.lse_a;
  const float p_a = fast_exp(lp_a);
  float lp_b = lp_a, p_b = p_a;
  if (terms & kLoadB) {
    lp_b = zb - c.lse_b;
    p_b = fast_exp(lp_b);
  }
  float a = 0.f, b = 0.f;
  if (terms & kNeedDzA) {
    if (terms & kGradLogpA) a += (is_target ? c.g_logp_a : 0.f) - c.g_logp_a * p_a;
    if (terms & kGradEntropyA) a -= c.g_entropy_a * p_a * (lp_a + c.entropy_a);
    if (terms & kGradKlAB) a += c.g_kl_ab * p_a * (lp_a - lp_b - c.kl_ab);
    if (terms & kGradKlBA) a += c.g_kl_ba * (p_a - p_b);
  }
  if (terms & kNeedDzB) {
    if (terms & kGradLogpB) b += (is_target ? c.g_logp_b : 0.f) - c.g_logp_b * p_b;
    if (terms & kGradEntropyB) b -= c.g_entropy_b * p_b * (lp_b + c.entropy_b);
    if (terms & kGradKlAB) b += c.g_kl_ab * (p_b - p_a);
    if (terms & kGradKlBA) b += c.g_kl_ba * p_b * (lp_b - lp_a - c.kl_ba);
  }
  dza = a * inv_t;
  dzb = b * inv_t;
}

// Reads a row's coefficients: the statistics of view b only with kLoadB, each gradient only
// when its term is present (a null pointer is then never read).
PAPO_HD DzRow load_dz_row(int64_t row, unsigned terms, const float* lse_a, const float* entropy_a,
                          const float* lse_b, const float* entropy_b, const float* kl_ab, const float* kl_ba,
                          const float* g_logp_a, const float* g_entropy_a, const float* g_logp_b,
                          const float* g_entropy_b, const float* g_kl_ab, const float* g_kl_ba) {
  DzRow c{};
  c.lse_a = lse_a[row];
  c.entropy_a = entropy_a[row];
  if (terms & kLoadB) {
    c.lse_b = lse_b[row];
    c.entropy_b = entropy_b[row];
    c.kl_ab = kl_ab[row];
    c.kl_ba = kl_ba[row];
  }
  if (terms & kGradLogpA) c.g_logp_a = g_logp_a[row];
  if (terms & kGradEntropyA) c.g_entropy_a = g_entropy_a[row];
  if (terms & kGradLogpB) c.g_logp_b = g_logp_b[row];
  if (terms & kGradEntropyB) c.g_entropy_b = g_entropy_b[row];
  if (terms & kGradKlAB) c.g_kl_ab = g_kl_ab[row];
  if (terms & kGradKlBA) c.g_kl_ba = g_kl_ba[row];
  return c;
}

}  // namespace papo_kernels::epilogue
