// The papo_kernels_C operator library: schemas, argument checks and the CPU registrations.
//
// These ops are the "cpp" backend of papo_kernels (papo_kernels/extension.py wraps them in the
// backend interface of papo_kernels/reference.py); the public, autograd-aware ops stay
// papo_kernels::token_stats / two_view_stats (papo_kernels/autograd.py). Every op checks its
// arguments here, before any kernel runs, and names the offending argument in the error.
//
//   forward_stats   phase 1 over all rows -> [logp_a, entropy_a, lse_a(, logp_b, entropy_b, lse_b,
//                   kl_ab, kl_ba)]
//   backward_grads  phase 2 over all rows: writes dh_a / dh_b, adds dW into weight_grad_acc
//   chunk_forward   the fused calls' phase 1 for one chunk, keeping its logits in `workspace`
//   chunk_backward  the fused calls' phase 2 for that chunk from the kept logits
//   build_info      the torch version this library was built against and its CPU capabilities
//
// strategy: "workspace" (chunk GEMMs into a [views * chunk_tokens, V] logit workspace) or "tiles"
// (tile GEMMs with in-cache epilogues, no workspace); see cpu/workspace.cpp and cpu/tiles.cpp.
// chunk_tokens: rows per chunk (workspace) or per dh partial (tiles backward); chunk_vocab:
// vocabulary columns per tile (tiles; chunk_forward), or vocabulary rows of a half weight upcast
// at a time (the workspace strategy's chunk GEMMs; chunk_backward). 0: the defaults.
//
// The workspace epilogue ops (epilogue_stats, epilogue_dz, cuda_archs: the CUDA kernels of cuda/
// and their host reference) are registered by epilogue_ops.cpp into the same library.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>

#include "cpu/epilogue.h"
#include "papo_kernels.h"

#ifndef PAPO_TORCH_VERSION
#define PAPO_TORCH_VERSION "unknown"
#endif
#ifndef PAPO_TORCH_GIT_VERSION
#define PAPO_TORCH_GIT_VERSION "unknown"
#endif

// Read from the shared library's bytes by papo_kernels/extension.py before it loads the
// library: a build made against another torch is refused with a rebuild message instead of
// failing inside the dynamic linker (or worse, loading against a changed ABI).
extern "C" __attribute__((used, visibility("default"))) const char papo_kernels_build_stamp[] =
    "papo_kernels_C build stamp: torch=" PAPO_TORCH_VERSION ";git=" PAPO_TORCH_GIT_VERSION ";";

namespace papo_kernels {
namespace {

// Bytes of the fp32 slab a half weight is upcast into at a time (workspace strategy): 8192 rows at
// H = 1024, 2340 at the 7B head's H = 3584; never fewer than kMinSlabRows rows.
constexpr int64_t kSlabBytes = 32 << 20;
constexpr int64_t kMinSlabRows = 256;
// Default vocabulary columns per tile (tiles strategy): a [rows, cols] fp32 tile stays in L2.
constexpr int64_t kDefaultTileCols = 256;
// Rows per tile GEMM in the tiles forward.
constexpr int64_t kTileRows = 256;

std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

void check_float_input(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "papo_kernels_C::", op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2, "papo_kernels_C::", op, ": ", name, " must be 2-D, got shape ", shape_str(t));
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype != at::kDouble, "papo_kernels_C::", op, ": ", name,
              " is float64; these ops take float16, bfloat16 or float32 (the cpp backend computes float64 "
              "inputs with the torch backend)");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, "papo_kernels_C::", op, ": ",
              name, " must be float16, bfloat16 or float32, got ", dtype);
}

// hidden_a [N, H], hidden_b (same), weight [V, H] of the same dtype, targets [N] int.
Problem make_problem(const char* op, const at::Tensor& hidden_a, const std::optional<at::Tensor>& hidden_b,
                     const at::Tensor& weight, const at::Tensor& targets, double temperature, int64_t ignore_index) {
  check_float_input(op, "hidden_a", hidden_a);
  check_float_input(op, "weight", weight);
  TORCH_CHECK(weight.size(0) > 0, "papo_kernels_C::", op, ": weight must have at least one vocabulary row, got ",
              "shape ", shape_str(weight));
  TORCH_CHECK(weight.size(1) == hidden_a.size(1), "papo_kernels_C::", op, ": weight must be [V, H] with H = ",
              "hidden_a.size(1) = ", hidden_a.size(1), ", got shape ", shape_str(weight));
  TORCH_CHECK(weight.scalar_type() == hidden_a.scalar_type(), "papo_kernels_C::", op, ": weight has dtype ",
              weight.scalar_type(), " but hidden_a has dtype ", hidden_a.scalar_type(), ": they must match");
  if (hidden_b.has_value()) {
    check_float_input(op, "hidden_b", *hidden_b);
    TORCH_CHECK(hidden_b->sizes() == hidden_a.sizes(), "papo_kernels_C::", op, ": hidden_b must have the shape ",
                "of hidden_a ", shape_str(hidden_a), ", got ", shape_str(*hidden_b));
    TORCH_CHECK(hidden_b->scalar_type() == hidden_a.scalar_type(), "papo_kernels_C::", op, ": hidden_b has dtype ",
                hidden_b->scalar_type(), " but hidden_a has dtype ", hidden_a.scalar_type(), ": they must match");
  }
  TORCH_CHECK(targets.device().is_cpu(), "papo_kernels_C::", op, ": targets must be a CPU tensor, got ",
              targets.device());
  TORCH_CHECK(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt, "papo_kernels_C::", op,
              ": targets must be int64 or int32 token ids, got ", targets.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden_a.size(0), "papo_kernels_C::", op,
              ": targets must have shape [", hidden_a.size(0), "] (hidden_a.size(0)), got ", shape_str(targets));
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "papo_kernels_C::", op,
              ": temperature must be finite and > 0, got ", temperature);
  return Problem{hidden_a, hidden_b.has_value() ? *hidden_b : at::Tensor(), weight,
                 targets.to(at::kLong).contiguous(), static_cast<float>(1.0 / temperature), ignore_index};
}

void check_row_vector(const char* op, const char* name, const at::Tensor& t, int64_t n) {
  TORCH_CHECK(t.device().is_cpu(), "papo_kernels_C::", op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "papo_kernels_C::", op, ": ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "papo_kernels_C::", op, ": ", name, " must have shape [", n,
              "] (one value per row), got ", shape_str(t));
}

at::Tensor row_vector(const char* op, const char* name, const std::optional<at::Tensor>& t, int64_t n) {
  if (!t.has_value()) return at::Tensor();
  check_row_vector(op, name, *t, n);
  return t->contiguous();
}

SavedStats make_stats(const char* op, const Problem& p, const at::Tensor& lse_a, const at::Tensor& entropy_a,
                      const std::optional<at::Tensor>& lse_b, const std::optional<at::Tensor>& entropy_b,
                      const std::optional<at::Tensor>& kl_ab, const std::optional<at::Tensor>& kl_ba) {
  const int64_t n = p.hidden_a.size(0);
  SavedStats s;
  check_row_vector(op, "lse_a", lse_a, n);
  check_row_vector(op, "entropy_a", entropy_a, n);
  s.lse_a = lse_a.contiguous();
  s.entropy_a = entropy_a.contiguous();
  const std::pair<const char*, const std::optional<at::Tensor>*> b_stats[] = {
      {"lse_b", &lse_b}, {"entropy_b", &entropy_b}, {"kl_ab", &kl_ab}, {"kl_ba", &kl_ba}};
  for (const auto& [name, t] : b_stats) {
    TORCH_CHECK(t->has_value() == p.two_views(), "papo_kernels_C::", op, ": ", name,
                p.two_views() ? " is required with two views (hidden_b given)" : " must be None with one view");
  }
  if (p.two_views()) {
    s.lse_b = row_vector(op, "lse_b", lse_b, n);
    s.entropy_b = row_vector(op, "entropy_b", entropy_b, n);
    s.kl_ab = row_vector(op, "kl_ab", kl_ab, n);
    s.kl_ba = row_vector(op, "kl_ba", kl_ba, n);
  }
  return s;
}

UpstreamGrads make_grads(const char* op, const Problem& p, const std::optional<at::Tensor>& logp_a,
                         const std::optional<at::Tensor>& entropy_a, const std::optional<at::Tensor>& logp_b,
                         const std::optional<at::Tensor>& entropy_b, const std::optional<at::Tensor>& kl_ab,
                         const std::optional<at::Tensor>& kl_ba) {
  const int64_t n = p.hidden_a.size(0);
  if (!p.two_views()) {
    const std::pair<const char*, const std::optional<at::Tensor>*> b_grads[] = {
        {"grad_logp_b", &logp_b}, {"grad_entropy_b", &entropy_b}, {"grad_kl_ab", &kl_ab}, {"grad_kl_ba", &kl_ba}};
    for (const auto& [name, t] : b_grads) {
      TORCH_CHECK(!t->has_value(), "papo_kernels_C::", op, ": ", name, " must be None with one view (no hidden_b)");
    }
  }
  return UpstreamGrads{row_vector(op, "grad_logp_a", logp_a, n),   row_vector(op, "grad_entropy_a", entropy_a, n),
                       row_vector(op, "grad_logp_b", logp_b, n),   row_vector(op, "grad_entropy_b", entropy_b, n),
                       row_vector(op, "grad_kl_ab", kl_ab, n),     row_vector(op, "grad_kl_ba", kl_ba, n)};
}

at::Tensor check_dh(const char* op, const char* name, const std::optional<at::Tensor>& dh, const at::Tensor& like) {
  if (!dh.has_value()) return at::Tensor();
  TORCH_CHECK(dh->device().is_cpu(), "papo_kernels_C::", op, ": ", name, " must be a CPU tensor, got ", dh->device());
  TORCH_CHECK(dh->sizes() == like.sizes() && dh->scalar_type() == like.scalar_type(), "papo_kernels_C::", op,
              ": ", name, " must be ", like.scalar_type(), " of shape ", shape_str(like), " (like the hidden states), ",
              "got ", dh->scalar_type(), " of shape ", shape_str(*dh));
  TORCH_CHECK(dh->is_contiguous(), "papo_kernels_C::", op, ": ", name, " must be contiguous");
  return *dh;
}

GradOutputs make_outputs(const char* op, const Problem& p, const std::optional<at::Tensor>& dh_a,
                         const std::optional<at::Tensor>& dh_b, const std::optional<at::Tensor>& weight_grad_acc,
                         bool b_in_dw) {
  GradOutputs o;
  o.dh_a = check_dh(op, "dh_a", dh_a, p.hidden_a);
  TORCH_CHECK(!dh_b.has_value() || p.two_views(), "papo_kernels_C::", op, ": dh_b needs hidden_b (one view given)");
  if (p.two_views()) o.dh_b = check_dh(op, "dh_b", dh_b, p.hidden_b);
  TORCH_CHECK(!b_in_dw || p.two_views(), "papo_kernels_C::", op, ": b_in_dw needs hidden_b (one view given)");
  o.b_in_dw = b_in_dw;
  if (weight_grad_acc.has_value()) {
    const at::Tensor& acc = *weight_grad_acc;
    TORCH_CHECK(acc.device().is_cpu() && acc.scalar_type() == at::kFloat && acc.sizes() == p.weight.sizes() &&
                    acc.is_contiguous(),
                "papo_kernels_C::", op, ": weight_grad_acc must be a contiguous CPU float32 tensor of the weight's ",
                "shape ", shape_str(p.weight), ", got ", acc.scalar_type(), " of shape ", shape_str(acc),
                acc.is_contiguous() ? "" : " (not contiguous)");
    o.weight_grad_acc = acc;
  }
  return o;
}

int64_t slab_rows(int64_t chunk_vocab, const Problem& p) {
  if (chunk_vocab > 0) return chunk_vocab;
  return std::max(kMinSlabRows, kSlabBytes / (4 * p.weight.size(1)));
}

bool use_workspace(const char* op, c10::string_view strategy) {
  TORCH_CHECK(strategy == "workspace" || strategy == "tiles", "papo_kernels_C::", op,
              ": strategy must be 'workspace' or 'tiles', got '", std::string(strategy), "'");
  return strategy == "workspace";
}

void check_chunks(const char* op, int64_t chunk_tokens, int64_t chunk_vocab) {
  TORCH_CHECK(chunk_tokens > 0, "papo_kernels_C::", op, ": chunk_tokens must be > 0, got ", chunk_tokens);
  TORCH_CHECK(chunk_vocab >= 0, "papo_kernels_C::", op, ": chunk_vocab must be >= 0 (0: the default), got ",
              chunk_vocab);
}

void check_workspace(const char* op, const at::Tensor& workspace, const Problem& p) {
  const int64_t views = p.two_views() ? 2 : 1;
  const int64_t needed = views * p.hidden_a.size(0) * p.weight.size(0);
  TORCH_CHECK(workspace.device().is_cpu() && workspace.scalar_type() == at::kFloat && workspace.is_contiguous(),
              "papo_kernels_C::", op, ": workspace must be a contiguous CPU float32 tensor, got ",
              workspace.scalar_type(), " on ", workspace.device());
  TORCH_CHECK(workspace.numel() >= needed, "papo_kernels_C::", op, ": workspace must hold at least views * N * V = ",
              views, " * ", p.hidden_a.size(0), " * ", p.weight.size(0), " = ", needed, " floats, got ",
              workspace.numel());
}

// ---------------------------------------------------------------- CPU implementations

std::vector<at::Tensor> forward_stats_cpu(const at::Tensor& hidden_a, const std::optional<at::Tensor>& hidden_b,
                                          const at::Tensor& weight, const at::Tensor& targets, double temperature,
                                          int64_t ignore_index, c10::string_view strategy, int64_t chunk_tokens,
                                          int64_t chunk_vocab) {
  const char* op = "forward_stats";
  const Problem p = make_problem(op, hidden_a, hidden_b, weight, targets, temperature, ignore_index);
  check_chunks(op, chunk_tokens, chunk_vocab);
  if (use_workspace(op, strategy)) {
    return cpu::forward_stats_workspace(p, chunk_tokens, slab_rows(chunk_vocab, p));
  }
  return cpu::forward_stats_tiles(p, kTileRows, chunk_vocab > 0 ? chunk_vocab : kDefaultTileCols);
}

void backward_grads_cpu(const at::Tensor& hidden_a, const std::optional<at::Tensor>& hidden_b,
                        const at::Tensor& weight, const at::Tensor& targets, const at::Tensor& lse_a,
                        const at::Tensor& entropy_a, const std::optional<at::Tensor>& lse_b,
                        const std::optional<at::Tensor>& entropy_b, const std::optional<at::Tensor>& kl_ab,
                        const std::optional<at::Tensor>& kl_ba, const std::optional<at::Tensor>& grad_logp_a,
                        const std::optional<at::Tensor>& grad_entropy_a, const std::optional<at::Tensor>& grad_logp_b,
                        const std::optional<at::Tensor>& grad_entropy_b, const std::optional<at::Tensor>& grad_kl_ab,
                        const std::optional<at::Tensor>& grad_kl_ba, const std::optional<at::Tensor>& dh_a,
                        const std::optional<at::Tensor>& dh_b, const std::optional<at::Tensor>& weight_grad_acc,
                        bool b_in_dw, double temperature, int64_t ignore_index, c10::string_view strategy,
                        int64_t chunk_tokens, int64_t chunk_vocab) {
  const char* op = "backward_grads";
  const Problem p = make_problem(op, hidden_a, hidden_b, weight, targets, temperature, ignore_index);
  const SavedStats stats = make_stats(op, p, lse_a, entropy_a, lse_b, entropy_b, kl_ab, kl_ba);
  const UpstreamGrads grads =
      make_grads(op, p, grad_logp_a, grad_entropy_a, grad_logp_b, grad_entropy_b, grad_kl_ab, grad_kl_ba);
  const GradOutputs out = make_outputs(op, p, dh_a, dh_b, weight_grad_acc, b_in_dw);
  check_chunks(op, chunk_tokens, chunk_vocab);
  if (use_workspace(op, strategy)) {
    cpu::backward_grads_workspace(p, stats, grads, out, chunk_tokens, slab_rows(chunk_vocab, p));
  } else {
    cpu::backward_grads_tiles(p, stats, grads, out, chunk_tokens, chunk_vocab > 0 ? chunk_vocab : kDefaultTileCols);
  }
}

std::vector<at::Tensor> chunk_forward_cpu(const at::Tensor& workspace, const at::Tensor& hidden_a,
                                          const std::optional<at::Tensor>& hidden_b, const at::Tensor& weight,
                                          const at::Tensor& targets, double temperature, int64_t ignore_index,
                                          int64_t chunk_vocab) {
  const char* op = "chunk_forward";
  const Problem p = make_problem(op, hidden_a, hidden_b, weight, targets, temperature, ignore_index);
  check_workspace(op, workspace, p);
  check_chunks(op, 1, chunk_vocab);
  return cpu::chunk_forward(workspace, p, kTileRows, chunk_vocab > 0 ? chunk_vocab : kDefaultTileCols);
}

void chunk_backward_cpu(const at::Tensor& workspace, const at::Tensor& hidden_a,
                        const std::optional<at::Tensor>& hidden_b, const at::Tensor& weight, const at::Tensor& targets,
                        const at::Tensor& lse_a, const at::Tensor& entropy_a, const std::optional<at::Tensor>& lse_b,
                        const std::optional<at::Tensor>& entropy_b, const std::optional<at::Tensor>& kl_ab,
                        const std::optional<at::Tensor>& kl_ba, const std::optional<at::Tensor>& grad_logp_a,
                        const std::optional<at::Tensor>& grad_entropy_a, const std::optional<at::Tensor>& grad_logp_b,
                        const std::optional<at::Tensor>& grad_entropy_b, const std::optional<at::Tensor>& grad_kl_ab,
                        const std::optional<at::Tensor>& grad_kl_ba, const std::optional<at::Tensor>& dh_a,
                        const std::optional<at::Tensor>& dh_b, const std::optional<at::Tensor>& weight_grad_acc,
                        bool b_in_dw, double temperature, int64_t ignore_index, int64_t chunk_vocab) {
  const char* op = "chunk_backward";
  const Problem p = make_problem(op, hidden_a, hidden_b, weight, targets, temperature, ignore_index);
  check_workspace(op, workspace, p);
  const SavedStats stats = make_stats(op, p, lse_a, entropy_a, lse_b, entropy_b, kl_ab, kl_ba);
  const UpstreamGrads grads =
      make_grads(op, p, grad_logp_a, grad_entropy_a, grad_logp_b, grad_entropy_b, grad_kl_ab, grad_kl_ba);
  const GradOutputs out = make_outputs(op, p, dh_a, dh_b, weight_grad_acc, b_in_dw);
  check_chunks(op, 1, chunk_vocab);
  cpu::chunk_backward(workspace, p, stats, grads, out, slab_rows(chunk_vocab, p));
}

std::string build_info() {
#ifdef _OPENMP
  // at::parallel_for is an inline OpenMP region: a build without -fopenmp runs it on one thread
  constexpr const char* openmp = "1";
#else
  constexpr const char* openmp = "0";
#endif
  std::ostringstream s;
  s << "torch=" << PAPO_TORCH_VERSION << ";git=" << PAPO_TORCH_GIT_VERSION
    << ";cpu_capability=" << cpu::epilogue_kernels().capability << ";compiled=DEFAULT"
    << (cpu::epilogue_kernels_AVX2() != nullptr ? ",AVX2" : "")
    << (cpu::epilogue_kernels_AVX512() != nullptr ? ",AVX512" : "") << ";openmp=" << openmp
    << ";threads=" << at::get_num_threads();
  return s.str();
}

}  // namespace
}  // namespace papo_kernels

TORCH_LIBRARY(papo_kernels_C, m) {
  m.def(
      "forward_stats(Tensor hidden_a, Tensor? hidden_b, Tensor weight, Tensor targets, float temperature, "
      "int ignore_index, str strategy, int chunk_tokens, int chunk_vocab) -> Tensor[]");
  m.def(
      "backward_grads(Tensor hidden_a, Tensor? hidden_b, Tensor weight, Tensor targets, Tensor lse_a, "
      "Tensor entropy_a, Tensor? lse_b, Tensor? entropy_b, Tensor? kl_ab, Tensor? kl_ba, Tensor? grad_logp_a, "
      "Tensor? grad_entropy_a, Tensor? grad_logp_b, Tensor? grad_entropy_b, Tensor? grad_kl_ab, "
      "Tensor? grad_kl_ba, Tensor(a!)? dh_a, Tensor(b!)? dh_b, Tensor(c!)? weight_grad_acc, bool b_in_dw, "
      "float temperature, int ignore_index, str strategy, int chunk_tokens, int chunk_vocab) -> ()");
  m.def(
      "chunk_forward(Tensor(a!) workspace, Tensor hidden_a, Tensor? hidden_b, Tensor weight, Tensor targets, "
      "float temperature, int ignore_index, int chunk_vocab) -> Tensor[]");
  m.def(
      "chunk_backward(Tensor(a!) workspace, Tensor hidden_a, Tensor? hidden_b, Tensor weight, Tensor targets, "
      "Tensor lse_a, Tensor entropy_a, Tensor? lse_b, Tensor? entropy_b, Tensor? kl_ab, Tensor? kl_ba, "
      "Tensor? grad_logp_a, Tensor? grad_entropy_a, Tensor? grad_logp_b, Tensor? grad_entropy_b, "
      "Tensor? grad_kl_ab, Tensor? grad_kl_ba, Tensor(b!)? dh_a, Tensor(c!)? dh_b, Tensor(d!)? weight_grad_acc, "
      "bool b_in_dw, float temperature, int ignore_index, int chunk_vocab) -> ()");
  m.def("build_info() -> str", &papo_kernels::build_info);
}

TORCH_LIBRARY_IMPL(papo_kernels_C, CPU, m) {
  m.impl("forward_stats", &papo_kernels::forward_stats_cpu);
  m.impl("backward_grads", &papo_kernels::backward_grads_cpu);
  m.impl("chunk_forward", &papo_kernels::chunk_forward_cpu);
  m.impl("chunk_backward", &papo_kernels::chunk_backward_cpu);
}

// These ops have CPU kernels only (a CUDA build adds the workspace epilogues, epilogue_ops.cpp):
// CUDA tensors reach the same checks, which name the argument and its device, instead of the
// dispatcher's generic "could not run ... with arguments from the CUDA backend".
TORCH_LIBRARY_IMPL(papo_kernels_C, CUDA, m) {
  m.impl("forward_stats", &papo_kernels::forward_stats_cpu);
  m.impl("backward_grads", &papo_kernels::backward_grads_cpu);
  m.impl("chunk_forward", &papo_kernels::chunk_forward_cpu);
  m.impl("chunk_backward", &papo_kernels::chunk_backward_cpu);
}
