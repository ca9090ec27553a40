// Strategy "workspace": chunk GEMMs into a bounded fp32 logit workspace, epilogues over whole rows.
//
// Per chunk of C rows (both views stacked, so W is read once per GEMM):
//
//   Z  = [h_a; h_b] W^T            [views * C, V] fp32, one ATen/BLAS GEMM (all threads)
//   stats: fold + finish            parallel over rows, at::vec, each row's segments in L1
//                                   (the fused calls' chunk_forward instead fills Z with the
//                                   tile GEMMs of tiles.cpp, folding each tile while in cache)
//   dZ over Z in place              parallel over rows (the fused calls reuse the forward's Z;
//                                   the stats ops' backward recomputes it with the same GEMM)
//   dh = dZ W                       one GEMM for the views that need dh (fp32 accumulation)
//   dW += dZ^T [h_a; h_b]           one GEMM into the fp32 accumulator (view b only when live)
//
// FLOPs: 6HV per token and view for the fused calls, 8HV for the stats ops' forward + backward.
// Extra memory: the workspace (views * C * V * 4 bytes), the stacked rows and dh rows of one
// chunk, and for half weights one fp32 slab of `slab_rows` vocabulary rows. Every row is reduced
// by one thread in a fixed order and BLAS runs with a fixed thread count, so results are
// bitwise reproducible at a fixed thread count.
#include <ATen/Parallel.h>

#include "common.h"

namespace papo_kernels::cpu {
namespace {

// z ([rows, V] view of the workspace) = x W^T
void logits_gemm(const at::Tensor& z, const at::Tensor& x, const at::Tensor& weight, int64_t slab_rows) {
  for_each_weight_slab(weight, slab_rows, [&](int64_t v0, const at::Tensor& w32) {
    at::Tensor out = z.narrow(1, v0, w32.size(0));
    at::mm_out(out, x, w32.t());
  });
}

// Statistics of the c rows whose logits are in z ([views * c, V]) into rows [r0, r0 + c) of outs.
void stats_epilogue(const at::Tensor& z, const Problem& p, int64_t r0, int64_t c, std::vector<at::Tensor>& outs) {
  const int64_t vocab = p.weight.size(0);
  std::vector<RowState> states(c);
  reset_states(states.data(), c);
  const float* za = z.data_ptr<float>();
  const FoldArgs fold{za, p.two_views() ? za + c * vocab : nullptr, vocab, vocab, 0,
                      p.targets.data_ptr<int64_t>() + r0, p.ignore_index, vocab, p.inv_t, states.data()};
  const FinishArgs finish = finish_args(p, states.data(), outs, r0);
  const EpilogueKernels& k = epilogue_kernels();
  at::parallel_for(0, c, 1, [&](int64_t b, int64_t e) {
    k.fold(fold, b, e);
    k.finish(finish, b, e);
  });
}

// From the chunk's logits z ([views * c, V], views as in plan.load_b) and its stacked rows x:
// dZ in place, then dh rows [r0, r0 + c) of the outputs and dW.
void grads_from_logits(const at::Tensor& z, const at::Tensor& x, const Problem& p, const SavedStats& s,
                       const UpstreamGrads& g, const GradOutputs& o, const GradPlan& plan, int64_t r0,
                       int64_t c, int64_t slab_rows) {
  const int64_t vocab = p.weight.size(0);
  const DzArgs args = dz_args(p, s, g, plan, z.data_ptr<float>(), c, vocab, vocab, 0, r0);
  const EpilogueKernels& k = epilogue_kernels();
  at::parallel_for(0, c, 1, [&](int64_t b, int64_t e) { k.dz(args, b, e); });

  // dZ rows feeding dh: view a's, view b's or both (adjacent in the workspace: one GEMM)
  const bool dh_a = o.dh_a.defined(), dh_b = o.dh_b.defined();
  const int64_t h0 = dh_a ? 0 : c;
  const int64_t h_rows = (dh_a ? c : 0) + (dh_b ? c : 0);
  // dZ rows feeding dW: view a's, and view b's when it is live
  const int64_t w_rows = o.weight_grad_acc.defined() ? (o.b_in_dw ? 2 * c : c) : 0;
  at::Tensor dh_rows;
  if (h_rows > 0) {
    // fp32 hidden with one view needing dh: the GEMM writes the output rows directly
    const at::Tensor& only = dh_a ? o.dh_a : o.dh_b;
    const bool direct = (dh_a != dh_b) && only.scalar_type() == at::kFloat;
    dh_rows = direct ? only.narrow(0, r0, c) : at::empty({h_rows, p.hidden_a.size(1)}, z.options());
  }
  for_each_weight_slab(p.weight, slab_rows, [&](int64_t v0, const at::Tensor& w32) {
    const int64_t n = w32.size(0);
    if (h_rows > 0) {
      at::Tensor dz_h = z.narrow(0, h0, h_rows).narrow(1, v0, n);
      if (v0 == 0) {
        at::mm_out(dh_rows, dz_h, w32);
      } else {
        dh_rows.addmm_(dz_h, w32);
      }
    }
    if (w_rows > 0) {
      o.weight_grad_acc.narrow(0, v0, n).addmm_(z.narrow(0, 0, w_rows).narrow(1, v0, n).t(),
                                                x.narrow(0, 0, w_rows));
    }
  });
  if (h_rows > 0) write_dh(dh_rows, o, r0, c);
}

}  // namespace

std::vector<at::Tensor> forward_stats_workspace(const Problem& p, int64_t chunk_rows, int64_t slab_rows) {
  const int64_t n = p.hidden_a.size(0), vocab = p.weight.size(0);
  std::vector<at::Tensor> outs = empty_stats(p, n);
  if (n == 0) return outs;
  const int64_t views = p.two_views() ? 2 : 1;
  const int64_t c_max = std::min(chunk_rows, n);
  at::Tensor workspace = at::empty({views * c_max, vocab}, p.hidden_a.options().dtype(at::kFloat));
  for (int64_t r0 = 0; r0 < n; r0 += c_max) {
    const int64_t c = std::min(c_max, n - r0);
    const at::Tensor z = workspace.narrow(0, 0, views * c);
    logits_gemm(z, stacked_rows(p, r0, c, p.two_views()), p.weight, slab_rows);
    stats_epilogue(z, p, r0, c, outs);
  }
  return outs;
}

void backward_grads_workspace(const Problem& p, const SavedStats& stats, const UpstreamGrads& grads,
                              const GradOutputs& out, int64_t chunk_rows, int64_t slab_rows) {
  const int64_t n = p.hidden_a.size(0), vocab = p.weight.size(0);
  const GradPlan plan = GradPlan::make(p, grads, out);
  if (n == 0 || !plan.any()) {
    if (out.dh_a.defined()) out.dh_a.zero_();
    if (out.dh_b.defined()) out.dh_b.zero_();
    return;
  }
  const int64_t views = plan.load_b ? 2 : 1;
  const int64_t c_max = std::min(chunk_rows, n);
  at::Tensor workspace = at::empty({views * c_max, vocab}, p.hidden_a.options().dtype(at::kFloat));
  for (int64_t r0 = 0; r0 < n; r0 += c_max) {
    const int64_t c = std::min(c_max, n - r0);
    const at::Tensor z = workspace.narrow(0, 0, views * c);
    const at::Tensor x = stacked_rows(p, r0, c, plan.load_b);
    logits_gemm(z, x, p.weight, slab_rows);  // the recompute GEMM of the stats ops
    grads_from_logits(z, x, p, stats, grads, out, plan, r0, c, slab_rows);
  }
}

std::vector<at::Tensor> chunk_forward(const at::Tensor& workspace, const Problem& p, int64_t tile_rows,
                                      int64_t tile_cols) {
  const int64_t c = p.hidden_a.size(0), vocab = p.weight.size(0);
  if (c == 0) return empty_stats(p, c);
  const int64_t views = p.two_views() ? 2 : 1;
  const at::Tensor z = workspace.reshape({-1}).narrow(0, 0, views * c * vocab).view({views * c, vocab});
  // per-thread tile GEMMs into the workspace, each tile folded while in cache: one pass over the
  // logits fewer than a chunk GEMM followed by the epilogue
  return forward_stats_tiles(p, tile_rows, tile_cols, z);
}

void chunk_backward(const at::Tensor& workspace, const Problem& p, const SavedStats& stats,
                    const UpstreamGrads& grads, const GradOutputs& out, int64_t slab_rows) {
  const int64_t c = p.hidden_a.size(0), vocab = p.weight.size(0);
  GradPlan plan = GradPlan::make(p, grads, out);
  if (c == 0 || !plan.any()) {
    if (out.dh_a.defined()) out.dh_a.zero_();
    if (out.dh_b.defined()) out.dh_b.zero_();
    return;
  }
  // chunk_forward stacked both views in the workspace whenever there were two: view b's logits
  // are there anyway, so the dW GEMM can take both views' rows.
  const int64_t views = p.two_views() ? 2 : 1;
  const at::Tensor z = workspace.reshape({-1}).narrow(0, 0, views * c * vocab).view({views * c, vocab});
  if (p.two_views() && !plan.load_b) {
    // view b's logits are present but unused: view a's dZ alone
    grads_from_logits(z.narrow(0, 0, c), stacked_rows(p, 0, c, false), p, stats, grads, out, plan, 0, c,
                      slab_rows);
    return;
  }
  grads_from_logits(z, stacked_rows(p, 0, c, plan.load_b), p, stats, grads, out, plan, 0, c, slab_rows);
}

}  // namespace papo_kernels::cpu
