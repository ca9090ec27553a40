// Strategy "tiles": tile GEMMs with the epilogue applied while the tile is in cache; no logit
// workspace, logits recomputed for the gradient.
//
// Forward, in parallel over token blocks (one contiguous block of rows per thread):
//
//   for each vocabulary tile W_t (tile_cols rows of W, fp32):
//     for each sub-block of tile_rows rows h_s of the thread's block:
//       z = h_s W_t^T                  tile GEMM (single-threaded BLAS inside the parallel region)
//       fold z into the rows' running (m, S, U', X, z_y)            at::vec, online over tiles
//   finish: lse, logp, entropy, KLs
//
// W_t stays in L2 while the thread's sub-blocks pass over it; the thread's rows stay in L3.
//
// Backward, per chunk of rows, in parallel over vocabulary slices (one slice per thread):
//
//   for each tile W_t of the thread's slice:
//     z = [h_a; h_b] W_t^T ; dZ in place (at::vec)
//     dh_partial[thread] += dZ W_t       private [views * C, H] partial, no races
//     dW[tile] += dZ^T [h_a; h_b]        the thread owns these rows of dW, no races
//   dh = sum of the partials in thread order (fixed order: bitwise reproducible at a fixed
//   thread count)
//
// FLOPs: 8HV per token and view for forward + backward (the recompute GEMM). Extra memory: per
// thread a [tile_rows, tile_cols] logit tile per view and fp32 operand copies of one tile, plus
// the chunk's stacked rows and one dh partial per thread; never a [C, V] block.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include "common.h"

namespace papo_kernels::cpu {
namespace {

// fp32 view of rows [r0, r0 + n) of t: the rows themselves when t is fp32, else a copy in buffer.
at::Tensor fp32_rows(const at::Tensor& t, int64_t r0, int64_t n, at::Tensor& buffer) {
  if (t.scalar_type() == at::kFloat) return t.narrow(0, r0, n);
  at::Tensor out = buffer.narrow(0, 0, n);
  out.copy_(t.narrow(0, r0, n));
  return out;
}

at::Tensor operand_buffer(const at::Tensor& t, int64_t rows) {
  if (t.scalar_type() == at::kFloat) return at::Tensor();
  return at::empty({rows, t.size(1)}, t.options().dtype(at::kFloat));
}

}  // namespace

std::vector<at::Tensor> forward_stats_tiles(const Problem& p, int64_t tile_rows, int64_t tile_cols,
                                            const at::Tensor& keep) {
  const int64_t n = p.hidden_a.size(0), vocab = p.weight.size(0);
  std::vector<at::Tensor> outs = empty_stats(p, n);
  if (n == 0) return outs;
  const bool two = p.two_views();
  tile_cols = std::min(tile_cols, vocab);
  std::vector<RowState> states(n);
  reset_states(states.data(), n);
  const EpilogueKernels& k = epilogue_kernels();
  const int64_t* targets = p.targets.data_ptr<int64_t>();
  const at::ThreadLocalState caller_state;
  // grain 1: ATen hands each thread one contiguous block of rows
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    const SingleThreadedBlas blas_guard;
    const int64_t sub = std::min(tile_rows, end - begin);
    const auto f32 = p.hidden_a.options().dtype(at::kFloat);
    // without `keep`, one reusable tile per view; with it, the tiles are windows of `keep`
    const at::Tensor za_tile = keep.defined() ? at::Tensor() : at::empty({sub, tile_cols}, f32);
    const at::Tensor zb_tile = (two && !keep.defined()) ? at::empty({sub, tile_cols}, f32) : at::Tensor();
    at::Tensor xa_buf = operand_buffer(p.hidden_a, sub);
    at::Tensor xb_buf = two ? operand_buffer(p.hidden_b, sub) : at::Tensor();
    at::Tensor w_buf = operand_buffer(p.weight, tile_cols);
    for (int64_t v0 = 0; v0 < vocab; v0 += tile_cols) {
      const int64_t width = std::min(tile_cols, vocab - v0);
      const at::Tensor w_t = fp32_rows(p.weight, v0, width, w_buf).t();
      for (int64_t m0 = begin; m0 < end; m0 += sub) {
        const int64_t m = std::min(sub, end - m0);
        at::Tensor za = keep.defined() ? keep.narrow(0, m0, m).narrow(1, v0, width)
                                       : za_tile.narrow(0, 0, m).narrow(1, 0, width);
        at::mm_out(za, fp32_rows(p.hidden_a, m0, m, xa_buf), w_t);
        at::Tensor zb;
        if (two) {
          zb = keep.defined() ? keep.narrow(0, n + m0, m).narrow(1, v0, width)
                              : zb_tile.narrow(0, 0, m).narrow(1, 0, width);
          at::mm_out(zb, fp32_rows(p.hidden_b, m0, m, xb_buf), w_t);
        }
        // fold the tile while it is in cache (the GEMM just wrote it)
        const FoldArgs fold{za.data_ptr<float>(), two ? zb.data_ptr<float>() : nullptr, za.stride(0), width, v0,
                            targets + m0, p.ignore_index, vocab, p.inv_t, states.data() + m0};
        k.fold(fold, 0, m);
      }
    }
    const FinishArgs finish = finish_args(p, states.data(), outs, 0);
    k.finish(finish, begin, end);
  });
  return outs;
}

void backward_grads_tiles(const Problem& p, const SavedStats& stats, const UpstreamGrads& grads,
                          const GradOutputs& out, int64_t chunk_rows, int64_t tile_cols) {
  const int64_t n = p.hidden_a.size(0), vocab = p.weight.size(0), hid = p.hidden_a.size(1);
  const GradPlan plan = GradPlan::make(p, grads, out);
  if (n == 0 || !plan.any()) {
    if (out.dh_a.defined()) out.dh_a.zero_();
    if (out.dh_b.defined()) out.dh_b.zero_();
    return;
  }
  tile_cols = std::min(tile_cols, vocab);
  const int64_t views = plan.load_b ? 2 : 1;
  const bool dh_a = out.dh_a.defined(), dh_b = out.dh_b.defined();
  const bool need_dw = out.weight_grad_acc.defined();
  const EpilogueKernels& k = epilogue_kernels();
  // One vocabulary slice per thread, fixed by the thread count: the dh sum order is too.
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), vocab));
  const int64_t c_max = std::min(chunk_rows, n);
  const auto f32 = p.hidden_a.options().dtype(at::kFloat);
  const at::ThreadLocalState caller_state;
  for (int64_t r0 = 0; r0 < n; r0 += c_max) {
    const int64_t c = std::min(c_max, n - r0);
    const at::Tensor x = stacked_rows(p, r0, c, plan.load_b);
    const int64_t h0 = dh_a ? 0 : c;
    const int64_t h_rows = (dh_a ? c : 0) + (dh_b ? c : 0);
    const int64_t w_rows = need_dw ? (out.b_in_dw ? 2 * c : c) : 0;
    at::Tensor partials = h_rows > 0 ? at::zeros({slices, h_rows, hid}, f32) : at::Tensor();
    at::parallel_for(0, slices, 1, [&](int64_t s_begin, int64_t s_end) {
      const at::ThreadLocalStateGuard state_guard(caller_state);
      const SingleThreadedBlas blas_guard;
      at::Tensor z_tile = at::empty({views * c, tile_cols}, f32);
      at::Tensor w_buf = operand_buffer(p.weight, tile_cols);
      for (int64_t s = s_begin; s < s_end; ++s) {
        const int64_t v_begin = vocab * s / slices, v_end = vocab * (s + 1) / slices;
        for (int64_t v0 = v_begin; v0 < v_end; v0 += tile_cols) {
          const int64_t width = std::min(tile_cols, v_end - v0);
          const at::Tensor w32 = fp32_rows(p.weight, v0, width, w_buf);
          at::Tensor z = z_tile.narrow(1, 0, width);
          at::mm_out(z, x, w32.t());
          const DzArgs args = dz_args(p, stats, grads, plan, z_tile.data_ptr<float>(), c, tile_cols, width, v0, r0);
          k.dz(args, 0, c);
          if (h_rows > 0) partials[s].addmm_(z.narrow(0, h0, h_rows), w32);
          if (w_rows > 0) {
            out.weight_grad_acc.narrow(0, v0, width).addmm_(z.narrow(0, 0, w_rows).t(), x.narrow(0, 0, w_rows));
          }
        }
      }
    });
    if (h_rows > 0) {
      at::Tensor dh_rows = partials[0];
      for (int64_t s = 1; s < slices; ++s) dh_rows.add_(partials[s]);
      write_dh(dh_rows, out, r0, c);
    }
  }
}

}  // namespace papo_kernels::cpu
