// The row epilogues (epilogue.h) written with at::vec, compiled once per CPU capability.
//
// Each epilogue_<capability>.cpp defines CPU_CAPABILITY / CPU_CAPABILITY_<X> and includes this
// file once, after nothing else: at::vec's Vectorized<float> then has that capability's width
// and intrinsics (and Sleef's vectorized exp on AVX2/AVX512), and everything here lives in the
// namespace papo_kernels::cpu::<CPU_CAPABILITY>, so the copies never collide at link time. Only
// float loops and scalar math are used, no std containers, so no inline function from a
// standard header is emitted with another capability's instructions.
//
// Speed: a scalar exp per logit would cost more than the GEMMs' whole time budget, so every
// column is touched by vector code; the scalar loops only handle the last few columns of a
// tile. Accuracy: within a segment of kSegment columns the sums are fp32 vector lanes (each lane
// adds at most kSegment / lanes terms), across segments and tiles they are fp64.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "epilogue.h"

namespace papo_kernels::cpu::CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;

// Columns folded per segment: both views' segments (2 x 8 KB) stay in L1 between the max pass
// and the exp pass.
constexpr int64_t kSegment = 2048;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

// max that propagates NaN (a NaN logit must make the row NaN, never be skipped)
inline float nan_max(float a, float b) {
  if (a != a) return a;
  if (b != b) return b;
  return b > a ? b : a;
}

inline double lanes_sum(const Vec& v) {
  float lanes[Vec::size()];
  v.store(lanes);
  double s = 0.0;
  for (int64_t i = 0; i < Vec::size(); ++i) s += lanes[i];
  return s;
}

inline float segment_max(const float* z, int64_t n) {
  Vec acc0(kNegInf), acc1(kNegInf);
  int64_t j = 0;
  for (; j + 2 * Vec::size() <= n; j += 2 * Vec::size()) {
    acc0 = at::vec::maximum(acc0, Vec::loadu(z + j));
    acc1 = at::vec::maximum(acc1, Vec::loadu(z + j + Vec::size()));
  }
  for (; j + Vec::size() <= n; j += Vec::size()) acc0 = at::vec::maximum(acc0, Vec::loadu(z + j));
  acc0 = at::vec::maximum(acc0, acc1);
  float lanes[Vec::size()];
  acc0.store(lanes);
  float m = kNegInf;
  for (int64_t i = 0; i < Vec::size(); ++i) m = nan_max(m, lanes[i]);
  for (; j < n; ++j) m = nan_max(m, z[j]);
  return m;
}

// Folds a segment's sums, taken relative to m_new >= v.m, into the running state.
inline void combine(ViewState& v, float m_new, double s, double u, double x) {
  if (v.m == kNegInf) {  // first segment: nothing to rescale (and -inf - m_new has no meaning)
    v.m = m_new;
    v.s = s;
    v.u = u;
    v.x = x;
    return;
  }
  const double delta = static_cast<double>(v.m) - static_cast<double>(m_new);  // <= 0
  const double scale = std::exp(delta);
  // U' <- e^(m-m') (U' + (m-m') S): the shifted sum follows the max
  v.u = scale * (v.u + delta * v.s) + u;
  v.s = scale * v.s + s;
  v.x = scale * v.x + x;
  v.m = m_new;
}

template <bool kTwo>
void fold_row(const float* za, const float* zb, int64_t width, int64_t local_target, float inv_t,
              RowState& st) {
  const Vec vinv(inv_t);
  for (int64_t s0 = 0; s0 < width; s0 += kSegment) {
    const int64_t n = min_i64(kSegment, width - s0);
    const float* pa = za + s0;
    const float* pb = kTwo ? zb + s0 : nullptr;
    // inv_t > 0, so max(Z / T) = max(Z) / T: the max pass reads the raw products
    const float ma = nan_max(st.a.m, segment_max(pa, n) * inv_t);
    const float mb = kTwo ? nan_max(st.b.m, segment_max(pb, n) * inv_t) : 0.0f;
    const Vec vma(ma), vmb(mb);
    Vec sa(0.0f), ua(0.0f), sb(0.0f), ub(0.0f), xab(0.0f), xba(0.0f);
    int64_t j = 0;
    for (; j + Vec::size() <= n; j += Vec::size()) {
      const Vec raw_a = Vec::loadu(pa + j);
      const Vec da = at::vec::fmsub(raw_a, vinv, vma);  // z_a - m_a
      const Vec ea = da.exp();
      sa = sa + ea;
      ua = at::vec::fmadd(ea, da, ua);
      if constexpr (kTwo) {
        const Vec raw_b = Vec::loadu(pb + j);
        const Vec db = at::vec::fmsub(raw_b, vinv, vmb);
        const Vec eb = db.exp();
        sb = sb + eb;
        ub = at::vec::fmadd(eb, db, ub);
        // z_a - z_b from the unshifted products: exactly 0 for identical views
        const Vec diff = (raw_a - raw_b) * vinv;
        xab = at::vec::fmadd(ea, diff, xab);
        xba = at::vec::fnmadd(eb, diff, xba);
      }
    }
    double s_a = lanes_sum(sa), u_a = lanes_sum(ua), s_b = 0, u_b = 0, x_ab = 0, x_ba = 0;
    if constexpr (kTwo) {
      s_b = lanes_sum(sb);
      u_b = lanes_sum(ub);
      x_ab = lanes_sum(xab);
      x_ba = lanes_sum(xba);
    }
    for (; j < n; ++j) {
      const float da = std::fma(pa[j], inv_t, -ma);
      const float ea = std::exp(da);
      s_a += ea;
      u_a += static_cast<double>(ea) * da;
      if constexpr (kTwo) {
        const float db = std::fma(pb[j], inv_t, -mb);
        const float eb = std::exp(db);
        const float diff = (pa[j] - pb[j]) * inv_t;
        s_b += eb;
        u_b += static_cast<double>(eb) * db;
        x_ab += static_cast<double>(ea) * diff;
        x_ba -= static_cast<double>(eb) * diff;
      }
    }
    combine(st.a, ma, s_a, u_a, x_ab);
    if constexpr (kTwo) combine(st.b, mb, s_b, u_b, x_ba);
  }
  if (local_target >= 0 && local_target < width) {
    st.a.z_target = za[local_target] * inv_t;
    if constexpr (kTwo) st.b.z_target = zb[local_target] * inv_t;
  }
}

void fold_rows(const FoldArgs& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = a.targets[r];
    // ignored rows (any hidden state, even NaN) and out-of-range rows: finish() writes 0 / NaN
    if (t == a.ignore_index || t < 0 || t >= a.vocab) continue;
    const int64_t local = t - a.col0;
    if (a.zb != nullptr) {
      fold_row<true>(a.za + r * a.ld_z, a.zb + r * a.ld_z, a.width, local, a.inv_t, a.states[r]);
    } else {
      fold_row<false>(a.za + r * a.ld_z, nullptr, a.width, local, a.inv_t, a.states[r]);
    }
  }
}

void finish_rows(const FinishArgs& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = a.targets[r];
    const bool ignored = t == a.ignore_index;
    if (ignored || t < 0 || t >= a.vocab) {
      const float fill = ignored ? 0.0f : kNaN;
      a.logp_a[r] = a.entropy_a[r] = a.lse_a[r] = fill;
      if (a.two_views) a.logp_b[r] = a.entropy_b[r] = a.lse_b[r] = a.kl_ab[r] = a.kl_ba[r] = fill;
      continue;
    }
    const ViewState& va = a.states[r].a;
    const double log_sa = std::log(va.s);
    const double lse_a = va.m + log_sa;
    a.lse_a[r] = static_cast<float>(lse_a);
    a.logp_a[r] = static_cast<float>(va.z_target - lse_a);
    a.entropy_a[r] = static_cast<float>(log_sa - va.u / va.s);
    if (!a.two_views) continue;
    const ViewState& vb = a.states[r].b;
    const double log_sb = std::log(vb.s);
    const double lse_b = vb.m + log_sb;
    a.lse_b[r] = static_cast<float>(lse_b);
    a.logp_b[r] = static_cast<float>(vb.z_target - lse_b);
    a.entropy_b[r] = static_cast<float>(log_sb - vb.u / vb.s);
    // shared-reference lse difference: ~1e-6 absolute KL error instead of lse_a - lse_b's
    const double dlse = (static_cast<double>(va.m) - vb.m) + (log_sa - log_sb);
    a.kl_ab[r] = static_cast<float>(va.x / va.s - dlse);
    a.kl_ba[r] = static_cast<float>(vb.x / vb.s + dlse);
  }
}

inline float at_row(const float* p, int64_t r) { return p == nullptr ? 0.0f : p[r]; }

// dZ of one row from per-row coefficients (already multiplied by 1/T):
//   dZ_a = p_a (A_a - B_a lp_a + K_a (lp_a - lp_b)) + P_a (p_a - p_b)
//   dZ_b = p_b (A_b - B_b lp_b - K_b (lp_a - lp_b)) + P_b (p_b - p_a)
// with A_a = -g_lpa - g_ha H_a - g_kab KL_ab, B_a = g_ha, K_a = g_kab, P_a = g_kba (mirrored for
// b); the +g_lp of the target column is added afterwards, in fp32.
struct RowCoefficients {
  float lse_a, lse_b;
  float A_a, B_a, K_a, P_a;
  float A_b, B_b, K_b, P_b;
};

template <bool kTwo, bool kNeedA, bool kNeedB>
void dz_row(const float* za, const float* zb, float* dza, float* dzb, int64_t width, float inv_t,
            const RowCoefficients& c) {
  const Vec vinv(inv_t), vlse_a(c.lse_a), vlse_b(c.lse_b);
  const Vec vAa(c.A_a), vBa(c.B_a), vKa(c.K_a), vPa(c.P_a);
  const Vec vAb(c.A_b), vBb(c.B_b), vKb(c.K_b), vPb(c.P_b);
  int64_t j = 0;
  for (; j + Vec::size() <= width; j += Vec::size()) {
    const Vec lpa = at::vec::fmsub(Vec::loadu(za + j), vinv, vlse_a);  // log p_a
    const Vec pa = lpa.exp();
    if constexpr (!kTwo) {
      (at::vec::fnmadd(vBa, lpa, vAa) * pa).store(dza + j);
    } else {
      const Vec lpb = at::vec::fmsub(Vec::loadu(zb + j), vinv, vlse_b);
      const Vec pb = lpb.exp();
      const Vec d = lpa - lpb;
      const Vec pd = pa - pb;
      // both loads happen before either store: dza / dzb may alias za / zb
      if constexpr (kNeedA) {
        const Vec ta = at::vec::fmadd(vKa, d, at::vec::fnmadd(vBa, lpa, vAa));
        at::vec::fmadd(pa, ta, vPa * pd).store(dza + j);
      }
      if constexpr (kNeedB) {
        const Vec tb = at::vec::fnmadd(vKb, d, at::vec::fnmadd(vBb, lpb, vAb));
        at::vec::fnmadd(vPb, pd, pb * tb).store(dzb + j);
      }
    }
  }
  for (; j < width; ++j) {
    const float lpa = std::fma(za[j], inv_t, -c.lse_a);
    const float pa = std::exp(lpa);
    if constexpr (!kTwo) {
      dza[j] = pa * (c.A_a - c.B_a * lpa);
    } else {
      const float lpb = std::fma(zb[j], inv_t, -c.lse_b);
      const float pb = std::exp(lpb);
      const float d = lpa - lpb;
      const float pd = pa - pb;
      if constexpr (kNeedA) dza[j] = pa * (c.A_a - c.B_a * lpa + c.K_a * d) + c.P_a * pd;
      if constexpr (kNeedB) dzb[j] = pb * (c.A_b - c.B_b * lpb - c.K_b * d) - c.P_b * pd;
    }
  }
}

void fill_row(float* p, int64_t width, float value) {
  if (p == nullptr) return;
  if (value == 0.0f) {
    std::memset(p, 0, sizeof(float) * width);
  } else {
    for (int64_t j = 0; j < width; ++j) p[j] = value;
  }
}

void dz_rows(const DzArgs& a, int64_t r0, int64_t r1) {
  const bool two = a.zb != nullptr;
  const double inv_t = a.inv_t;
  for (int64_t r = r0; r < r1; ++r) {
    float* dza = a.dza == nullptr ? nullptr : a.dza + r * a.ld_dz;
    float* dzb = a.dzb == nullptr ? nullptr : a.dzb + r * a.ld_dz;
    const int64_t t = a.targets[r];
    if (t == a.ignore_index || t < 0 || t >= a.vocab) {
      // ignored rows give exactly 0; out-of-range rows NaN, which reaches dh and dW
      const float fill = t == a.ignore_index ? 0.0f : kNaN;
      fill_row(dza, a.width, fill);
      fill_row(dzb, a.width, fill);
      continue;
    }
    // per-row coefficients in fp64; a missing gradient contributes nothing (not 0 * stat)
    const double g_lpa = at_row(a.g_logp_a, r), g_ha = at_row(a.g_entropy_a, r);
    const double g_kab = at_row(a.g_kl_ab, r), g_kba = at_row(a.g_kl_ba, r);
    RowCoefficients c{};
    c.lse_a = a.lse_a[r];
    double A_a = -g_lpa;
    if (a.g_entropy_a != nullptr) A_a -= g_ha * a.entropy_a[r];
    c.B_a = static_cast<float>(g_ha * inv_t);
    if (two) {
      const double g_lpb = at_row(a.g_logp_b, r), g_hb = at_row(a.g_entropy_b, r);
      if (a.g_kl_ab != nullptr) A_a -= g_kab * a.kl_ab[r];
      double A_b = -g_lpb;
      if (a.g_entropy_b != nullptr) A_b -= g_hb * a.entropy_b[r];
      if (a.g_kl_ba != nullptr) A_b -= g_kba * a.kl_ba[r];
      c.lse_b = a.lse_b[r];
      c.K_a = static_cast<float>(g_kab * inv_t);
      c.P_a = static_cast<float>(g_kba * inv_t);
      c.A_b = static_cast<float>(A_b * inv_t);
      c.B_b = static_cast<float>(g_hb * inv_t);
      c.K_b = static_cast<float>(g_kba * inv_t);
      c.P_b = static_cast<float>(g_kab * inv_t);
    }
    c.A_a = static_cast<float>(A_a * inv_t);
    const float* za = a.za + r * a.ld_z;
    const float* zb = two ? a.zb + r * a.ld_z : nullptr;
    if (!two) {
      if (dza != nullptr) dz_row<false, true, false>(za, nullptr, dza, nullptr, a.width, a.inv_t, c);
    } else if (dza != nullptr && dzb != nullptr) {
      dz_row<true, true, true>(za, zb, dza, dzb, a.width, a.inv_t, c);
    } else if (dza != nullptr) {
      dz_row<true, true, false>(za, zb, dza, nullptr, a.width, a.inv_t, c);
    } else if (dzb != nullptr) {
      dz_row<true, false, true>(za, zb, nullptr, dzb, a.width, a.inv_t, c);
    }
    // (onehot - p): the +g_lp of the target column, added in fp32 after the p terms
    const int64_t local = t - a.col0;
    if (local >= 0 && local < a.width) {
      if (dza != nullptr) dza[local] += static_cast<float>(g_lpa * inv_t);
      if (dzb != nullptr) dzb[local] += static_cast<float>(at_row(a.g_logp_b, r) * inv_t);
    }
  }
}

}  // namespace

inline const EpilogueKernels* kernel_table() {
  static const EpilogueKernels table{C10_STRINGIZE(CPU_CAPABILITY), &fold_rows, &finish_rows, &dz_rows};
  return &table;
}

}  // namespace papo_kernels::cpu::CPU_CAPABILITY
