// Helpers shared by the CPU strategies (workspace.cpp, tiles.cpp): fp32 operand blocks, output
// allocation and the epilogue argument blocks.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../papo_kernels.h"
#include "epilogue.h"

// MKL's thread-local thread count, C interface (exported by torch's MKL builds; null elsewhere:
// the weak reference resolves to nothing). torch turns MKL's dynamic adjustment off, so a GEMM
// called inside a parallel region would otherwise start its own threads on top of ours.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace papo_kernels::cpu {

// Single-threaded BLAS in this thread while in scope: the tile GEMMs run inside our parallel
// regions, one per thread. (Other BLAS libraries run single-threaded inside OpenMP regions.)
// The ATen ops called inside a parallel region also need the caller's thread-local state
// (at::ThreadLocalStateGuard): OpenMP workers start with autograd enabled, and a custom op's
// kernel runs below autograd only on the calling thread.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : previous_(MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_;
};

inline const float* ptr_or_null(const at::Tensor& t, int64_t offset = 0) {
  return t.defined() ? t.data_ptr<float>() + offset : nullptr;
}

// Rows [r0, r0 + c) of view a, then (with_b) of view b, stacked into one fp32 [views * c, H]
// block for a single GEMM. Rows whose target is ignore_index may hold anything (even NaN): they
// are zeroed so that 0 * NaN never reaches dW.
inline at::Tensor stacked_rows(const Problem& p, int64_t r0, int64_t c, bool with_b) {
  const int64_t hid = p.hidden_a.size(1);
  const int64_t views = with_b ? 2 : 1;
  at::Tensor x = at::empty({views * c, hid}, p.hidden_a.options().dtype(at::kFloat));
  x.narrow(0, 0, c).copy_(p.hidden_a.narrow(0, r0, c));
  if (with_b) x.narrow(0, c, c).copy_(p.hidden_b.narrow(0, r0, c));
  const int64_t* t = p.targets.data_ptr<int64_t>() + r0;
  float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < c; ++i) {
    if (t[i] != p.ignore_index) continue;
    for (int64_t v = 0; v < views; ++v) std::memset(xp + (v * c + i) * hid, 0, sizeof(float) * hid);
  }
  return x;
}

// Calls f(v0, w32) for the weight in fp32: the weight itself when it is fp32 (one call), else
// slabs of at most `slab_rows` vocabulary rows upcast into one reusable buffer, so a half head
// never gets a full fp32 copy.
template <typename F>
void for_each_weight_slab(const at::Tensor& weight, int64_t slab_rows, F&& f) {
  if (weight.scalar_type() == at::kFloat) {
    f(int64_t{0}, weight);
    return;
  }
  const int64_t vocab = weight.size(0);
  const int64_t slab = std::max<int64_t>(1, std::min(slab_rows, vocab));
  at::Tensor buffer = at::empty({slab, weight.size(1)}, weight.options().dtype(at::kFloat));
  for (int64_t v0 = 0; v0 < vocab; v0 += slab) {
    const int64_t n = std::min(slab, vocab - v0);
    at::Tensor w32 = buffer.narrow(0, 0, n);
    w32.copy_(weight.narrow(0, v0, n));
    f(v0, w32);
  }
}

// The forward outputs, in RowStats order: logp_a, entropy_a, lse_a[, logp_b, entropy_b, lse_b,
// kl_ab, kl_ba], each [n] float32.
inline std::vector<at::Tensor> empty_stats(const Problem& p, int64_t n) {
  const int count = p.two_views() ? 8 : 3;
  std::vector<at::Tensor> outs;
  outs.reserve(count);
  for (int i = 0; i < count; ++i) outs.push_back(at::empty({n}, p.hidden_a.options().dtype(at::kFloat)));
  return outs;
}

// FinishArgs writing rows [r0, ...) of `outs` (as returned by empty_stats).
inline FinishArgs finish_args(const Problem& p, const RowState* states, std::vector<at::Tensor>& outs,
                              int64_t r0) {
  auto at_row = [&](int i) { return i < static_cast<int>(outs.size()) ? outs[i].data_ptr<float>() + r0 : nullptr; };
  return FinishArgs{states, p.targets.data_ptr<int64_t>() + r0, p.ignore_index, p.weight.size(0),
                    p.two_views(), at_row(0), at_row(1), at_row(2), at_row(3), at_row(4), at_row(5),
                    at_row(6), at_row(7)};
}

// Which views' dZ the backward needs, and which rows of the stacked [z_a; z_b] block feed the
// dh and dW GEMMs.
struct GradPlan {
  bool need_dz_a, need_dz_b, load_b;
  bool any() const { return need_dz_a || need_dz_b; }

  static GradPlan make(const Problem& p, const UpstreamGrads& g, const GradOutputs& o) {
    const bool need_dw = o.weight_grad_acc.defined();
    GradPlan plan{};
    plan.need_dz_a = o.dh_a.defined() || need_dw;
    plan.need_dz_b = p.two_views() && (o.dh_b.defined() || (need_dw && o.b_in_dw));
    // view b's logits are needed for its own dZ and for either KL's gradient
    plan.load_b = p.two_views() && (g.kl_ab.defined() || g.kl_ba.defined() || plan.need_dz_b);
    return plan;
  }
};

// DzArgs for rows [r0, ...) of the chunk whose logits are z ([views * c, ld] with view b at row c),
// computing dZ in place.
inline DzArgs dz_args(const Problem& p, const SavedStats& s, const UpstreamGrads& g, const GradPlan& plan,
                      float* z, int64_t c, int64_t ld, int64_t width, int64_t col0, int64_t r0) {
  float* za = z;
  float* zb = plan.load_b ? z + c * ld : nullptr;
  const bool two = plan.load_b;
  return DzArgs{za, zb, ld,
                plan.need_dz_a ? za : nullptr, plan.need_dz_b ? zb : nullptr, ld,
                width, col0, p.targets.data_ptr<int64_t>() + r0, p.ignore_index, p.weight.size(0), p.inv_t,
                ptr_or_null(s.lse_a, r0), ptr_or_null(s.entropy_a, r0),
                two ? ptr_or_null(s.lse_b, r0) : nullptr, two ? ptr_or_null(s.entropy_b, r0) : nullptr,
                two ? ptr_or_null(s.kl_ab, r0) : nullptr, two ? ptr_or_null(s.kl_ba, r0) : nullptr,
                ptr_or_null(g.logp_a, r0), ptr_or_null(g.entropy_a, r0),
                two ? ptr_or_null(g.logp_b, r0) : nullptr, two ? ptr_or_null(g.entropy_b, r0) : nullptr,
                two ? ptr_or_null(g.kl_ab, r0) : nullptr, two ? ptr_or_null(g.kl_ba, r0) : nullptr};
}

// Copies the dh rows computed for a chunk ([views_out * c, H] fp32, view a first) into the outputs.
inline void write_dh(const at::Tensor& dh_rows, const GradOutputs& o, int64_t r0, int64_t c) {
  int64_t row = 0;
  for (const at::Tensor* dh : {&o.dh_a, &o.dh_b}) {
    if (!dh->defined()) continue;
    at::Tensor dst = dh->narrow(0, r0, c);
    if (dst.data_ptr() != dh_rows.narrow(0, row, c).data_ptr()) dst.copy_(dh_rows.narrow(0, row, c));
    row += c;
  }
}

}  // namespace papo_kernels::cpu
