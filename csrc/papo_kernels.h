// Declarations shared by the op registration (papo_kernels.cpp) and the CPU kernels (cpu/).
//
// All tensors reaching these functions were checked by papo_kernels.cpp: hidden states [N, H]
// and weight [V, H] of one dtype among float16 / bfloat16 / float32 (any strides), targets [N]
// contiguous int64, per-row statistics and gradients [N] contiguous float32, outputs contiguous.
// Compute is fp32 throughout: half inputs are upcast per block before their GEMM, GEMMs
// accumulate in fp32 (ATen/BLAS), dh is cast once into the hidden dtype, dW adds into an fp32
// accumulator.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace papo_kernels {

// The inputs of one call (or of one chunk of rows, for the chunk ops).
struct Problem {
  at::Tensor hidden_a;  // [N, H]
  at::Tensor hidden_b;  // [N, H], undefined for one view
  at::Tensor weight;    // [V, H]
  at::Tensor targets;   // [N] int64, contiguous
  float inv_t;          // 1 / temperature
  int64_t ignore_index;

  bool two_views() const { return hidden_b.defined(); }
};

// Saved per-row statistics (float32 [N]); the view-b ones are undefined for one view.
struct SavedStats {
  at::Tensor lse_a, entropy_a, lse_b, entropy_b, kl_ab, kl_ba;
};

// Upstream per-row gradients (float32 [N]); undefined means zero.
struct UpstreamGrads {
  at::Tensor logp_a, entropy_a, logp_b, entropy_b, kl_ab, kl_ba;
};

// Where the gradients go; undefined outputs are not needed.
struct GradOutputs {
  at::Tensor dh_a;             // [N, H], hidden dtype
  at::Tensor dh_b;             // [N, H], hidden dtype
  at::Tensor weight_grad_acc;  // [V, H] float32, added to
  bool b_in_dw;                // view b is live: dZ_b^T h_b enters dW
};

namespace cpu {

// Strategy "workspace": per chunk of `chunk_rows` rows, one GEMM of the stacked views into a
// [views * chunk_rows, V] fp32 logit workspace, then the epilogues over whole rows, in parallel
// over rows. `slab_rows`: vocabulary rows of a half weight upcast at a time.
// Returns {logp_a, entropy_a, lse_a} or, with two views, {.., logp_b, entropy_b, lse_b, kl_ab, kl_ba}.
std::vector<at::Tensor> forward_stats_workspace(const Problem& p, int64_t chunk_rows, int64_t slab_rows);
void backward_grads_workspace(const Problem& p, const SavedStats& stats, const UpstreamGrads& grads,
                              const GradOutputs& out, int64_t chunk_rows, int64_t slab_rows);

// The fused calls' chunk step with the workspace kept between the phases: chunk_forward writes
// the chunk's logits into `workspace` ([views * N, V] float32 or larger) with the tile GEMMs of
// forward_stats_tiles (each tile folded into the statistics while in cache) and returns the
// statistics; chunk_backward turns those logits into dZ in place and runs the dh / dW GEMMs (no
// recompute GEMM). `p` holds only the chunk's rows; `out.dh_*` are the chunk's rows of dh.
std::vector<at::Tensor> chunk_forward(const at::Tensor& workspace, const Problem& p, int64_t tile_rows,
                                      int64_t tile_cols);
void chunk_backward(const at::Tensor& workspace, const Problem& p, const SavedStats& stats,
                    const UpstreamGrads& grads, const GradOutputs& out, int64_t slab_rows);

// Strategy "tiles": no logit workspace. The forward runs in parallel over token blocks, each
// thread looping over vocabulary tiles of `tile_cols` columns (tile GEMM into a thread-local
// buffer, then the online epilogue while the tile is in cache). The backward runs chunk by chunk
// in parallel over vocabulary slices: each thread owns its slice of dW (no races) and keeps a
// private dh partial for the chunk, summed in a fixed order afterwards (bitwise reproducible at a
// fixed thread count).
// `keep` (optional, [views * N, V] fp32 with view b at row N): the tiles are written there instead
// of thread-local buffers, so the logits outlive the call (the fused calls' chunk_forward).
std::vector<at::Tensor> forward_stats_tiles(const Problem& p, int64_t tile_rows, int64_t tile_cols,
                                            const at::Tensor& keep = at::Tensor());
void backward_grads_tiles(const Problem& p, const SavedStats& stats, const UpstreamGrads& grads,
                          const GradOutputs& out, int64_t chunk_rows, int64_t tile_cols);

}  // namespace cpu
}  // namespace papo_kernels
