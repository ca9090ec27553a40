// ctest: the CUDA epilogues' math (csrc/cuda/epilogue_math.h) on the host, against double loops.
//
// The kernels call these functions per thread; here they run with the kernels' own column
// assignment (fold_thread_columns: 16-byte vectors of 4 or 8 logits, kStatsLoadBatch at a time,
// then the column tail; or every column alone for unaligned rows) and reduction tree
// (row_sums_reference: the shuffle butterflies replayed), so a CPU machine checks what every
// thread computes and how the 256 partial sums merge. Covered: V from 1 (fewer columns than
// threads) to 4099 (several batches and a tail), one and two views, temperature != 1, rows whose
// maximum comes last (the running max moves in every thread), merges with empty partial sums
// (exact), every combination of upstream gradient terms of dZ, the target column, and the row
// kinds (ignored, out of range). Plain C++: no torch needed. Exit status: failed checks.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "expect.h"

#include "../cuda/epilogue_math.h"

namespace {

namespace ep = papo_kernels::epilogue;

using papo_kernels_test::checks;
using papo_kernels_test::expect;
using papo_kernels_test::failures;

void expect_close(double got, double want, double tol, const std::string& what) {
  const bool ok = std::fabs(got - want) <= tol * (1.0 + std::fabs(want));
  expect(ok, what + ": got " + std::to_string(got) + ", want " + std::to_string(want));
}

// The statistics kernel's loads over float rows (z already scaled by inv_t on load).
struct Load {
  const float* za;
  const float* zb;
  float inv_t;

  template <int VEC>
  void vec(int64_t col, float (&a)[VEC], float (&b)[VEC]) const {
    for (int i = 0; i < VEC; ++i) {
      a[i] = za[col + i] * inv_t;
      if (zb != nullptr) b[i] = zb[col + i] * inv_t;
    }
  }
  void one(int64_t col, float& a, float& b) const {
    a = za[col] * inv_t;
    if (zb != nullptr) b = zb[col] * inv_t;
  }
};

struct Stats64 {
  double lse_a, entropy_a, logp_a, lse_b, entropy_b, logp_b, kl_ab, kl_ba;
};

Stats64 dense(const std::vector<float>& za, const std::vector<float>& zb, double inv_t, int64_t target) {
  auto view = [&](const std::vector<float>& z, std::vector<double>& lp) {
    double m = -INFINITY;
    for (float x : z) m = std::max(m, x * inv_t);
    double s = 0.0;
    for (float x : z) s += std::exp(x * inv_t - m);
    const double lse = m + std::log(s);
    lp.resize(z.size());
    for (size_t j = 0; j < z.size(); ++j) lp[j] = z[j] * inv_t - lse;
    return lse;
  };
  std::vector<double> la, lb;
  Stats64 r{};
  r.lse_a = view(za, la);
  r.lse_b = view(zb, lb);
  for (size_t j = 0; j < za.size(); ++j) {
    const double pa = std::exp(la[j]), pb = std::exp(lb[j]);
    r.entropy_a -= pa * la[j];
    r.entropy_b -= pb * lb[j];
    r.kl_ab += pa * (la[j] - lb[j]);
    r.kl_ba += pb * (lb[j] - la[j]);
  }
  r.logp_a = la[target];
  r.logp_b = lb[target];
  return r;
}

void test_statistics() {
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.f, 3.f);
  for (int64_t vocab : {1, 3, 37, 255, 1001, 4099}) {
    for (int vec : {4, 8}) {
      for (bool vectorized : {true, false}) {
        for (float temperature : {1.f, 0.7f}) {
          std::vector<float> za(vocab), zb(vocab);
          for (int64_t j = 0; j < vocab; ++j) {
            za[j] = normal(rng);
            zb[j] = za[j] + 0.5f * normal(rng);
          }
          za[vocab - 1] += 12.f;  // the row's max comes last: every running max moves
          const int64_t target = vocab / 2;
          const float inv_t = static_cast<float>(1.0 / temperature);
          const Load load{za.data(), zb.data(), inv_t};
          for (bool two : {true, false}) {
            const ep::RowSums sums = vec == 4 ? ep::row_sums_reference<4>(load, vocab, vectorized, two)
                                              : ep::row_sums_reference<8>(load, vocab, vectorized, two);
            float zy_a = 0.f, zy_b = 0.f;
            load.one(target, zy_a, zy_b);
            const ep::RowStatsOut o = ep::finish_row(sums, zy_a, zy_b, two);
            const Stats64 want = dense(za, zb, 1.0 / temperature, target);
            const std::string what = "V=" + std::to_string(vocab) + " vec=" + std::to_string(vec) +
                                     (vectorized ? " vector" : " scalar") + " T=" + std::to_string(temperature) +
                                     (two ? " two views" : " one view");
            expect_close(o.lse_a, want.lse_a, 2e-6, what + " lse_a");
            expect_close(o.logp_a, want.logp_a, 2e-6, what + " logp_a");
            expect_close(o.entropy_a, want.entropy_a, 2e-5, what + " entropy_a");
            if (two) {
              expect_close(o.lse_b, want.lse_b, 2e-6, what + " lse_b");
              expect_close(o.logp_b, want.logp_b, 2e-6, what + " logp_b");
              expect_close(o.entropy_b, want.entropy_b, 2e-5, what + " entropy_b");
              expect_close(o.kl_ab, want.kl_ab, 2e-5, what + " kl_ab");
              expect_close(o.kl_ba, want.kl_ba, 2e-5, what + " kl_ba");
            }
          }
        }
      }
    }
  }
}

void test_merge_with_empty_sums_is_exact() {
  ep::RowSums x = ep::empty_sums();
  float za[4] = {1.f, -2.f, 3.5f, 0.25f}, zb[4] = {0.f, 1.f, 2.f, -1.f};
  ep::fold<4>(x, za, zb, true);
  ep::RowSums merged = x;
  ep::merge(merged, ep::empty_sums(), true);
  expect(std::memcmp(&merged, &x, sizeof(x)) == 0, "merging empty sums changes nothing");
  ep::RowSums from_empty = ep::empty_sums();
  ep::merge(from_empty, x, true);
  expect(std::memcmp(&from_empty, &x, sizeof(x)) == 0, "merging into empty sums copies them");
  // two halves merged equal one fold of all columns
  ep::RowSums half1 = ep::empty_sums(), half2 = ep::empty_sums(), whole = ep::empty_sums();
  float a1[2] = {1.f, -2.f}, b1[2] = {0.f, 1.f}, a2[2] = {3.5f, 0.25f}, b2[2] = {2.f, -1.f};
  ep::fold<2>(half1, a1, b1, true);
  ep::fold<2>(half2, a2, b2, true);
  ep::merge(half1, half2, true);
  ep::fold<4>(whole, za, zb, true);
  expect_close(half1.a.m, whole.a.m, 0, "merged max");
  expect_close(half1.a.s, whole.a.s, 1e-6, "merged S");
  expect_close(half1.a.u, whole.a.u, 1e-6, "merged U'");
  expect_close(half1.b.s, whole.b.s, 1e-6, "merged S_b");
  expect_close(half1.x_ab, whole.x_ab, 1e-6, "merged X_ab");
  expect_close(half1.x_ba, whole.x_ba, 1e-6, "merged X_ba");
}

void test_dz_terms() {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 1.f);
  ep::DzRow c{};
  c.lse_a = 3.1f;
  c.entropy_a = 1.7f;
  c.lse_b = 2.4f;
  c.entropy_b = 2.2f;
  c.kl_ab = 0.3f;
  c.kl_ba = 0.25f;
  float* g[6] = {&c.g_logp_a, &c.g_entropy_a, &c.g_logp_b, &c.g_entropy_b, &c.g_kl_ab, &c.g_kl_ba};
  for (float* x : g) *x = normal(rng);
  const float inv_t = 1.f / 0.8f;
  for (unsigned grads = 0; grads < 64; ++grads) {
    const unsigned terms = grads | ep::kNeedDzA | ep::kNeedDzB | ep::kLoadB;
    for (int j = 0; j < 5; ++j) {
      const float za = normal(rng) * 2.f, zb = normal(rng) * 2.f;
      const bool is_target = j == 2;
      float dza = 0.f, dzb = 0.f;
      ep::dz_element(c, terms, inv_t, za, zb, is_target, dza, dzb);
      auto gv = [&](int k) { return (grads >> k) & 1u ? static_cast<double>(*g[k]) : 0.0; };
      const double lpa = za - static_cast<double>(c.lse_a), lpb = zb - static_cast<double>(c.lse_b);
      const double pa = std::exp(lpa), pb = std::exp(lpb), onehot = is_target ? 1.0 : 0.0;
      const double want_a = (gv(0) * (onehot - pa) - gv(1) * pa * (lpa + c.entropy_a) +
                             gv(4) * pa * (lpa - lpb - c.kl_ab) + gv(5) * (pa - pb)) *
                            inv_t;
      const double want_b = (gv(2) * (onehot - pb) - gv(3) * pb * (lpb + c.entropy_b) + gv(4) * (pb - pa) +
                             gv(5) * pb * (lpb - lpa - c.kl_ba)) *
                            inv_t;
      const std::string what = "dz terms " + std::to_string(grads) + " column " + std::to_string(j);
      expect(std::fabs(dza - want_a) <= 1e-5 * (1.0 + std::fabs(want_a)), what + " dz_a");
      expect(std::fabs(dzb - want_b) <= 1e-5 * (1.0 + std::fabs(want_b)), what + " dz_b");
    }
  }
  // view a alone: dZ_b stays 0 and view b's logits are not needed
  float dza = 1.f, dzb = 1.f;
  ep::dz_element(c, ep::kNeedDzA | ep::kGradLogpA, inv_t, 0.5f, NAN, false, dza, dzb);
  expect(std::isfinite(dza) && dzb == 0.f, "one view: dz_b exactly 0, z_b never read");
}

void test_row_kinds() {
  expect(ep::row_kind(-100, -100, 10) == ep::RowKind::kIgnored, "ignore_index is ignored");
  expect(ep::row_kind(10, -100, 10) == ep::RowKind::kBadTarget, "target == V is out of range");
  expect(ep::row_kind(-1, -100, 10) == ep::RowKind::kBadTarget, "a negative target is out of range");
  expect(ep::row_kind(7, 7, 10) == ep::RowKind::kIgnored, "ignore_index inside [0, V) is still ignored");
  expect(ep::row_kind(9, -100, 10) == ep::RowKind::kValid, "target V - 1 is valid");
  float data[8] = {};
  expect(ep::rows_aligned(data, 4, 4, 16) == (reinterpret_cast<uintptr_t>(data) % 16 == 0), "aligned rows");
  expect(!ep::rows_aligned(data, 3, 4, 16), "a row stride of 12 bytes is not 16-byte aligned");
  expect(ep::rows_aligned(nullptr, 3, 4, 16), "an absent view never prevents vector loads");
}

}  // namespace

int main() {
  test_statistics();
  test_merge_with_empty_sums_is_exact();
  test_dz_terms();
  test_row_kinds();
  std::printf("test_epilogue_math: %d checks, %d failed\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
