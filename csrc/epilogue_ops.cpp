// The workspace epilogue ops of papo_kernels_C: the CUDA kernels of csrc/cuda/ behind the
// dispatcher, their argument checks, and a host reference of those kernels for CPU tensors.
//
//   epilogue_stats(z_a, z_b?, targets, logp_a!, entropy_a!, lse_a!, logp_b!?, entropy_b!?, lse_b!?,
//                  kl_ab!?, kl_ba!?, temperature, ignore_index)
//       per-row statistics of one chunk's logits [C, V] (RowStats order), written in place
//   epilogue_dz(z_a, z_b?, dz_a!?, dz_b!?, targets, lse_a, entropy_a, lse_b?, entropy_b?, kl_ab?,
//               kl_ba?, grad_logp_a?, grad_entropy_a?, grad_logp_b?, grad_entropy_b?, grad_kl_ab?,
//               grad_kl_ba?, temperature, ignore_index)
//       dZ of that chunk in dz_a / dz_b's dtype (dz_a may be z_a itself: fp32, in place)
//   cuda_archs() -> str
//       the GPU architectures the kernels were compiled for ("80,90"), "" in a build without CUDA
//
// The Triton workspace path's chunk loop (papo_kernels/kernels/workspace.py, epilogue="cuda")
// calls them in place of its Triton epilogues; the semantics are those epilogues' (logits in
// fp32, bf16 or fp16 with unit column stride and any row stride; fp32 math; ignored rows exactly
// 0; targets outside [0, V) NaN; the vocabulary tail never read).
//
// CPU tensors run the host reference: the kernels' own per-thread column assignment and reduction
// tree (csrc/cuda/epilogue_math.h) replayed thread by thread, so a machine without a GPU checks
// the kernels' arithmetic (tests/test_cuda_epilogue.py, csrc/tests/test_epilogue_math.cpp). It is
// a reference, not a fast path. A build without CUDA (PAPO_WITH_CUDA undefined) registers, for
// CUDA tensors, the same checks followed by an error that says how to rebuild.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <sstream>
#include <string>

#include "cuda/epilogue_launch.h"
#include "cuda/epilogue_math.h"

#ifdef PAPO_WITH_CUDA
// c10's stream and guard, not ATen/cuda/CUDAContext.h: that one includes the cuBLAS / cuSPARSE
// headers, which a minimal CUDA toolkit (nvcc and the runtime only) lacks.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace papo_kernels {
namespace {

namespace ep = papo_kernels::epilogue;
using OptTensor = std::optional<at::Tensor>;

constexpr const char* kRebuildHint =
    "this build of papo_kernels._C has no CUDA kernels; rebuild it with them: "
    "PAPO_BUILD_CUDA=1 pip install --no-build-isolation -e . (needs a CUDA build of torch and the CUDA "
    "toolkit's nvcc; TORCH_CUDA_ARCH_LIST picks the GPU architectures, default 8.0;9.0 without a visible GPU)";

std::string shape_of(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

bool is_logit_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

ep::Dtype to_dtype(at::ScalarType t) {
  return t == at::kFloat ? ep::Dtype::kFloat32 : (t == at::kHalf ? ep::Dtype::kFloat16 : ep::Dtype::kBFloat16);
}

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& z_a) {
  TORCH_CHECK(t.device() == z_a.device(), "papo_kernels_C::", op, ": ", name, " is on ", t.device(),
              " but z_a is on ", z_a.device(), ": they must be on the same device");
}

// [C, V] logits or dZ: float32 / float16 / bfloat16, unit column stride, any row stride.
void check_matrix(const char* op, const char* name, const at::Tensor& t, int64_t rows, int64_t vocab) {
  TORCH_CHECK(t.dim() == 2, "papo_kernels_C::", op, ": ", name, " must be 2-D [C, V], got shape ", shape_of(t));
  TORCH_CHECK(rows < 0 || (t.size(0) == rows && t.size(1) == vocab), "papo_kernels_C::", op, ": ", name,
              " must have shape [", rows, ", ", vocab, "] (like z_a), got ", shape_of(t));
  TORCH_CHECK(is_logit_dtype(t.scalar_type()), "papo_kernels_C::", op, ": ", name,
              " must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "papo_kernels_C::", op, ": ", name,
              " must have unit column stride (rows may have any stride), got strides ", t.strides());
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) >= 1, "papo_kernels_C::", op, ": ", name,
              " must have a positive row stride, got strides ", t.strides());
}

void check_rows(const char* op, const char* name, const at::Tensor& t, const at::Tensor& z_a) {
  check_device(op, name, t, z_a);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "papo_kernels_C::", op, ": ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == z_a.size(0), "papo_kernels_C::", op, ": ", name, " must have shape [",
              z_a.size(0), "] (one value per row of z_a), got ", shape_of(t));
  TORCH_CHECK(t.is_contiguous(), "papo_kernels_C::", op, ": ", name, " must be contiguous");
}

// The logits and targets every epilogue reads.
struct Chunk {
  at::Tensor z_a, z_b, targets;  // z_b undefined for one view
  int64_t rows, vocab;
  float inv_t;
  int64_t ignore_index;
};

Chunk check_chunk(const char* op, const at::Tensor& z_a, const OptTensor& z_b, const at::Tensor& targets,
                  double temperature, int64_t ignore_index) {
  TORCH_CHECK(z_a.device().is_cpu() || z_a.device().is_cuda(), "papo_kernels_C::", op,
              ": z_a must be a CPU or CUDA tensor, got ", z_a.device());
  check_matrix(op, "z_a", z_a, -1, -1);
  const int64_t rows = z_a.size(0), vocab = z_a.size(1);
  TORCH_CHECK(vocab >= 1, "papo_kernels_C::", op, ": z_a must have at least one vocabulary column, got shape ",
              shape_of(z_a));
  TORCH_CHECK(rows < (int64_t{1} << 31), "papo_kernels_C::", op, ": z_a has ", rows,
              " rows; a chunk has fewer than 2^31");
  if (z_b.has_value()) {
    check_device(op, "z_b", *z_b, z_a);
    check_matrix(op, "z_b", *z_b, rows, vocab);
    TORCH_CHECK(z_b->scalar_type() == z_a.scalar_type(), "papo_kernels_C::", op, ": z_b has dtype ",
                z_b->scalar_type(), " but z_a has dtype ", z_a.scalar_type(), ": they must match");
  }
  check_device(op, "targets", targets, z_a);
  TORCH_CHECK(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt, "papo_kernels_C::", op,
              ": targets must be int64 or int32 token ids, got ", targets.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == rows, "papo_kernels_C::", op, ": targets must have shape [",
              rows, "] (z_a.size(0)), got ", shape_of(targets));
  TORCH_CHECK(targets.is_contiguous(), "papo_kernels_C::", op, ": targets must be contiguous");
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "papo_kernels_C::", op,
              ": temperature must be finite and > 0, got ", temperature);
  return Chunk{z_a, z_b.has_value() ? *z_b : at::Tensor(), targets, rows, vocab,
               static_cast<float>(1.0 / temperature), ignore_index};
}

// A view-b argument is required with z_b and must be None without it.
void check_view_b(const char* op, const char* name, const OptTensor& t, bool two) {
  TORCH_CHECK(t.has_value() == two, "papo_kernels_C::", op, ": ", name,
              two ? " is required with two views (z_b given)" : " must be None with one view (no z_b)");
}

int64_t target_at(const at::Tensor& targets, int64_t row) {
  return targets.scalar_type() == at::kInt ? targets.data_ptr<int32_t>()[row] : targets.data_ptr<int64_t>()[row];
}

// Calls f(T{}) with the host element type of a logit dtype.
template <typename F>
void with_host_type(at::ScalarType t, F&& f) {
  if (t == at::kFloat) {
    f(float{});
  } else if (t == at::kHalf) {
    f(c10::Half{});
  } else {
    f(c10::BFloat16{});
  }
}

// The statistics kernel's loads, on the host (epilogue_math.h's Load interface).
template <typename T>
struct HostRowLoad {
  const T* za;
  const T* zb;
  float inv_t;

  template <int VEC>
  void vec(int64_t col, float (&a)[VEC], float (&b)[VEC]) const {
    for (int i = 0; i < VEC; ++i) {
      a[i] = static_cast<float>(za[col + i]) * inv_t;
      if (zb != nullptr) b[i] = static_cast<float>(zb[col + i]) * inv_t;
    }
  }
  void one(int64_t col, float& a, float& b) const {
    a = static_cast<float>(za[col]) * inv_t;
    if (zb != nullptr) b = static_cast<float>(zb[col]) * inv_t;
  }
};

// ---------------------------------------------------------------- statistics

void stats_host_reference(const Chunk& c, float* const out[8]) {
  const bool two = c.z_b.defined();
  with_host_type(c.z_a.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    constexpr int VEC = ep::kVectorBytes / static_cast<int>(sizeof(T));
    const T* za0 = static_cast<const T*>(c.z_a.data_ptr());
    const T* zb0 = two ? static_cast<const T*>(c.z_b.data_ptr()) : nullptr;
    const int64_t ld_a = c.z_a.stride(0), ld_b = two ? c.z_b.stride(0) : 0;
    const bool vectorized = ep::rows_aligned(za0, ld_a, sizeof(T), ep::kVectorBytes) &&
                            ep::rows_aligned(zb0, ld_b, sizeof(T), ep::kVectorBytes);
    at::parallel_for(0, c.rows, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t target = target_at(c.targets, row);
        const ep::RowKind kind = ep::row_kind(target, c.ignore_index, c.vocab);
        ep::RowStatsOut o = ep::fill_stats(kind == ep::RowKind::kIgnored ? 0.f : ep::quiet_nan());
        if (kind == ep::RowKind::kValid) {
          const HostRowLoad<T> load{za0 + row * ld_a, two ? zb0 + row * ld_b : nullptr, c.inv_t};
          const ep::RowSums sums = ep::row_sums_reference<VEC>(load, c.vocab, vectorized, two);
          float zy_a = 0.f, zy_b = 0.f;
          load.one(target, zy_a, zy_b);
          o = ep::finish_row(sums, zy_a, zy_b, two);
        }
        const float values[8] = {o.logp_a, o.entropy_a, o.lse_a, o.logp_b, o.entropy_b, o.lse_b, o.kl_ab, o.kl_ba};
        for (int i = 0; i < (two ? 8 : 3); ++i) out[i][row] = values[i];
      }
    });
  });
}

void epilogue_stats(const at::Tensor& z_a, const OptTensor& z_b, const at::Tensor& targets, const at::Tensor& logp_a,
                    const at::Tensor& entropy_a, const at::Tensor& lse_a, const OptTensor& logp_b,
                    const OptTensor& entropy_b, const OptTensor& lse_b, const OptTensor& kl_ab,
                    const OptTensor& kl_ba, double temperature, int64_t ignore_index) {
  const char* op = "epilogue_stats";
  const Chunk c = check_chunk(op, z_a, z_b, targets, temperature, ignore_index);
  const bool two = c.z_b.defined();
  const std::pair<const char*, const at::Tensor*> outs_a[] = {
      {"logp_a", &logp_a}, {"entropy_a", &entropy_a}, {"lse_a", &lse_a}};
  const std::pair<const char*, const OptTensor*> outs_b[] = {
      {"logp_b", &logp_b}, {"entropy_b", &entropy_b}, {"lse_b", &lse_b}, {"kl_ab", &kl_ab}, {"kl_ba", &kl_ba}};
  float* out[8] = {};
  int i = 0;
  for (const auto& [name, t] : outs_a) {
    check_rows(op, name, *t, z_a);
    out[i++] = t->data_ptr<float>();
  }
  for (const auto& [name, t] : outs_b) {
    check_view_b(op, name, *t, two);
    if (two) {
      check_rows(op, name, **t, z_a);
      out[i] = (*t)->data_ptr<float>();
    }
    ++i;
  }
  if (c.rows == 0) return;
  if (z_a.device().is_cpu()) {
    stats_host_reference(c, out);
    return;
  }
#ifdef PAPO_WITH_CUDA
  const c10::cuda::CUDAGuard guard(z_a.device());
  ep::StatsLaunch args{};
  args.z_a = c.z_a.data_ptr();
  args.z_b = two ? c.z_b.data_ptr() : nullptr;
  args.ld_a = c.z_a.stride(0);
  args.ld_b = two ? c.z_b.stride(0) : 0;
  args.dtype = to_dtype(c.z_a.scalar_type());
  args.rows = c.rows;
  args.vocab = c.vocab;
  args.targets = c.targets.data_ptr();
  args.targets_int32 = c.targets.scalar_type() == at::kInt;
  args.ignore_index = c.ignore_index;
  args.inv_t = c.inv_t;
  for (int k = 0; k < 8; ++k) args.out[k] = out[k];
  ep::launch_stats_epilogue(args, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
  TORCH_CHECK(false, "papo_kernels_C::", op, ": got CUDA tensors, but ", kRebuildHint);
#endif
}

// ---------------------------------------------------------------- dZ

// dz must be the logits it is computed from (same memory, in place) or not overlap them at all.
void check_no_overlap(const char* op, const char* out_name, const at::Tensor& out, const char* in_name,
                      const at::Tensor& in, bool may_be_same) {
  if (may_be_same && out.data_ptr() == in.data_ptr() && out.strides() == in.strides() &&
      out.scalar_type() == in.scalar_type()) {
    return;
  }
  const at::MemOverlapStatus status = at::get_overlap_status(out, in);
  TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, "papo_kernels_C::",
              op, ": ", out_name, " overlaps ", in_name,
              may_be_same ? " without being the same tensor (in place needs the same memory, dtype and strides)" : "");
}

void dz_host_reference(const Chunk& c, const ep::DzLaunch& a) {
  with_host_type(c.z_a.scalar_type(), [&](auto z_zero) {
    using T = decltype(z_zero);
    const T* za0 = static_cast<const T*>(a.z_a);
    const T* zb0 = static_cast<const T*>(a.z_b);
    auto run = [&](auto out_zero) {
      using Out = decltype(out_zero);
      Out* dza0 = static_cast<Out*>(a.dz_a);
      Out* dzb0 = static_cast<Out*>(a.dz_b);
      at::parallel_for(0, c.rows, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t row = r0; row < r1; ++row) {
          const int64_t target = target_at(c.targets, row);
          const ep::RowKind kind = ep::row_kind(target, c.ignore_index, c.vocab);
          const float fill = kind == ep::RowKind::kBadTarget ? ep::quiet_nan() : 0.f;
          ep::DzRow coeffs{};
          if (kind == ep::RowKind::kValid) {
            coeffs = ep::load_dz_row(row, a.terms, a.lse_a, a.entropy_a, a.lse_b, a.entropy_b, a.kl_ab, a.kl_ba,
                                     a.g_logp_a, a.g_entropy_a, a.g_logp_b, a.g_entropy_b, a.g_kl_ab, a.g_kl_ba);
          }
          const T* za = za0 + row * a.ld_za;
          const T* zb = zb0 != nullptr ? zb0 + row * a.ld_zb : nullptr;
          Out* dza = dza0 != nullptr ? dza0 + row * a.ld_dza : nullptr;
          Out* dzb = dzb0 != nullptr ? dzb0 + row * a.ld_dzb : nullptr;
          for (int64_t col = 0; col < c.vocab; ++col) {
            float da = fill, db = fill;
            if (kind == ep::RowKind::kValid) {
              const float zav = static_cast<float>(za[col]) * a.inv_t;
              const float zbv = zb != nullptr ? static_cast<float>(zb[col]) * a.inv_t : 0.f;
              ep::dz_element(coeffs, a.terms, a.inv_t, zav, zbv, col == target, da, db);
            }
            if (dza != nullptr) dza[col] = static_cast<Out>(da);
            if (dzb != nullptr) dzb[col] = static_cast<Out>(db);
          }
        }
      });
    };
    if (a.dz_dtype == ep::Dtype::kFloat32) {
      run(float{});
    } else if (a.dz_dtype == ep::Dtype::kFloat16) {
      run(c10::Half{});
    } else {
      run(c10::BFloat16{});
    }
  });
}

const float* row_ptr(const char* op, const char* name, const OptTensor& t, const at::Tensor& z_a) {
  if (!t.has_value()) return nullptr;
  check_rows(op, name, *t, z_a);
  return t->data_ptr<float>();
}

void epilogue_dz(const at::Tensor& z_a, const OptTensor& z_b, const OptTensor& dz_a, const OptTensor& dz_b,
                 const at::Tensor& targets, const at::Tensor& lse_a, const at::Tensor& entropy_a,
                 const OptTensor& lse_b, const OptTensor& entropy_b, const OptTensor& kl_ab, const OptTensor& kl_ba,
                 const OptTensor& grad_logp_a, const OptTensor& grad_entropy_a, const OptTensor& grad_logp_b,
                 const OptTensor& grad_entropy_b, const OptTensor& grad_kl_ab, const OptTensor& grad_kl_ba,
                 double temperature, int64_t ignore_index) {
  const char* op = "epilogue_dz";
  const Chunk c = check_chunk(op, z_a, z_b, targets, temperature, ignore_index);
  const bool two = c.z_b.defined();
  TORCH_CHECK(!dz_b.has_value() || two, "papo_kernels_C::", op, ": dz_b needs z_b (view b's logits)");
  TORCH_CHECK(two || !(grad_kl_ab.has_value() || grad_kl_ba.has_value()), "papo_kernels_C::", op,
              ": grad_kl_ab / grad_kl_ba need z_b (a KL's gradient reads both views' logits)");
  TORCH_CHECK(two || !(grad_logp_b.has_value() || grad_entropy_b.has_value()), "papo_kernels_C::", op,
              ": grad_logp_b / grad_entropy_b need z_b (they enter view b's dZ)");
  ep::DzLaunch a{};
  for (const auto& [name, dz] : {std::pair<const char*, const OptTensor*>{"dz_a", &dz_a}, {"dz_b", &dz_b}}) {
    if (!dz->has_value()) continue;
    check_device(op, name, **dz, z_a);
    check_matrix(op, name, **dz, c.rows, c.vocab);
  }
  if (dz_a.has_value() && dz_b.has_value()) {
    TORCH_CHECK(dz_a->scalar_type() == dz_b->scalar_type(), "papo_kernels_C::", op, ": dz_a has dtype ",
                dz_a->scalar_type(), " but dz_b has dtype ", dz_b->scalar_type(), ": they must match");
    check_no_overlap(op, "dz_a", *dz_a, "dz_b", *dz_b, false);
  }
  if (dz_a.has_value()) {
    check_no_overlap(op, "dz_a", *dz_a, "z_a", z_a, true);
    if (two) check_no_overlap(op, "dz_a", *dz_a, "z_b", c.z_b, false);
  }
  if (dz_b.has_value()) {
    check_no_overlap(op, "dz_b", *dz_b, "z_b", c.z_b, true);
    check_no_overlap(op, "dz_b", *dz_b, "z_a", z_a, false);
  }
  for (const auto& [name, t] : {std::pair<const char*, const OptTensor*>{"lse_b", &lse_b}, {"entropy_b", &entropy_b},
                                {"kl_ab", &kl_ab}, {"kl_ba", &kl_ba}}) {
    check_view_b(op, name, *t, two);
  }
  check_rows(op, "lse_a", lse_a, z_a);
  check_rows(op, "entropy_a", entropy_a, z_a);
  a.lse_a = lse_a.data_ptr<float>();
  a.entropy_a = entropy_a.data_ptr<float>();
  a.lse_b = row_ptr(op, "lse_b", lse_b, z_a);
  a.entropy_b = row_ptr(op, "entropy_b", entropy_b, z_a);
  a.kl_ab = row_ptr(op, "kl_ab", kl_ab, z_a);
  a.kl_ba = row_ptr(op, "kl_ba", kl_ba, z_a);
  a.g_logp_a = row_ptr(op, "grad_logp_a", grad_logp_a, z_a);
  a.g_entropy_a = row_ptr(op, "grad_entropy_a", grad_entropy_a, z_a);
  a.g_logp_b = row_ptr(op, "grad_logp_b", grad_logp_b, z_a);
  a.g_entropy_b = row_ptr(op, "grad_entropy_b", grad_entropy_b, z_a);
  a.g_kl_ab = row_ptr(op, "grad_kl_ab", grad_kl_ab, z_a);
  a.g_kl_ba = row_ptr(op, "grad_kl_ba", grad_kl_ba, z_a);
  a.terms = (a.g_logp_a ? ep::kGradLogpA : 0u) | (a.g_entropy_a ? ep::kGradEntropyA : 0u) |
            (a.g_logp_b ? ep::kGradLogpB : 0u) | (a.g_entropy_b ? ep::kGradEntropyB : 0u) |
            (a.g_kl_ab ? ep::kGradKlAB : 0u) | (a.g_kl_ba ? ep::kGradKlBA : 0u) |
            (dz_a.has_value() ? ep::kNeedDzA : 0u) | (dz_b.has_value() ? ep::kNeedDzB : 0u) |
            (two ? ep::kLoadB : 0u);
  if (c.rows == 0 || !(dz_a.has_value() || dz_b.has_value())) return;
  a.z_a = c.z_a.data_ptr();
  a.z_b = two ? c.z_b.data_ptr() : nullptr;
  a.ld_za = c.z_a.stride(0);
  a.ld_zb = two ? c.z_b.stride(0) : 0;
  a.z_dtype = to_dtype(c.z_a.scalar_type());
  a.dz_a = dz_a.has_value() ? dz_a->data_ptr() : nullptr;
  a.dz_b = dz_b.has_value() ? dz_b->data_ptr() : nullptr;
  a.ld_dza = dz_a.has_value() ? dz_a->stride(0) : 0;
  a.ld_dzb = dz_b.has_value() ? dz_b->stride(0) : 0;
  a.dz_dtype = to_dtype((dz_a.has_value() ? *dz_a : *dz_b).scalar_type());
  a.rows = c.rows;
  a.vocab = c.vocab;
  a.targets = c.targets.data_ptr();
  a.targets_int32 = c.targets.scalar_type() == at::kInt;
  a.ignore_index = c.ignore_index;
  a.inv_t = c.inv_t;
  if (z_a.device().is_cpu()) {
    dz_host_reference(c, a);
    return;
  }
#ifdef PAPO_WITH_CUDA
  const c10::cuda::CUDAGuard guard(z_a.device());
  ep::launch_dz_epilogue(a, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
  TORCH_CHECK(false, "papo_kernels_C::", op, ": got CUDA tensors, but ", kRebuildHint);
#endif
}

std::string cuda_archs() {
#ifdef PAPO_WITH_CUDA
  return ep::compiled_cuda_archs();
#else
  return "";
#endif
}

}  // namespace
}  // namespace papo_kernels

TORCH_LIBRARY_FRAGMENT(papo_kernels_C, m) {
  m.def(
      "epilogue_stats(Tensor z_a, Tensor? z_b, Tensor targets, Tensor(a!) logp_a, Tensor(b!) entropy_a, "
      "Tensor(c!) lse_a, Tensor(d!)? logp_b, Tensor(e!)? entropy_b, Tensor(f!)? lse_b, Tensor(g!)? kl_ab, "
      "Tensor(h!)? kl_ba, float temperature, int ignore_index) -> ()");
  m.def(
      "epilogue_dz(Tensor z_a, Tensor? z_b, Tensor(a!)? dz_a, Tensor(b!)? dz_b, Tensor targets, Tensor lse_a, "
      "Tensor entropy_a, Tensor? lse_b, Tensor? entropy_b, Tensor? kl_ab, Tensor? kl_ba, Tensor? grad_logp_a, "
      "Tensor? grad_entropy_a, Tensor? grad_logp_b, Tensor? grad_entropy_b, Tensor? grad_kl_ab, "
      "Tensor? grad_kl_ba, float temperature, int ignore_index) -> ()");
  m.def("cuda_archs() -> str", &papo_kernels::cuda_archs);
}

// The same function for both keys: the checks are shared, the device picks the kernels or the
// host reference (or, without CUDA kernels, the rebuild error).
TORCH_LIBRARY_IMPL(papo_kernels_C, CPU, m) {
  m.impl("epilogue_stats", &papo_kernels::epilogue_stats);
  m.impl("epilogue_dz", &papo_kernels::epilogue_dz);
}

TORCH_LIBRARY_IMPL(papo_kernels_C, CUDA, m) {
  m.impl("epilogue_stats", &papo_kernels::epilogue_stats);
  m.impl("epilogue_dz", &papo_kernels::epilogue_dz);
}
