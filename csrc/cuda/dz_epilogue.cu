// The dZ epilogue of the workspace path in CUDA: dZ of a chunk's logits from the saved row
// statistics and the upstream per-row gradients (epilogue_math.h, dz_element), written in the
// dtype of the dh / dW GEMMs that follow.
//
// Layout: elementwise, no reduction, so a 2-D grid of (column spans, rows): each block converts
// kDzThreads * kDzColumns = 2,048 columns of one row, each thread kDzColumns (two fp32 or one half
// 16-byte vector), all loads issued before the math. The row's coefficients (12 floats and the target)
// are the same for the whole block: every thread reads them (one broadcast transaction per warp,
// served from L1 after the first). A row then costs one read of z_a (and z_b) and one write of
// dZ_a (and dZ_b): ~40 flops and 2 exps per column pair against 8 bytes read and 4 written (bf16),
// memory-bound on every GPU this targets. Rows whose target is ignore_index get dZ = 0 and rows
// with a target outside [0, V) NaN, without reading their logits.
//
// dZ may be the logits' own buffer (fp32, in place): each element is read before it is written,
// by the same thread, and nothing else reads it, so the pointers are not __restrict__ and the
// loads are not the read-only (.nc) kind.
#include "epilogue_device.cuh"

namespace papo_kernels::epilogue {
namespace {

template <typename T, typename Out>
__global__ void __launch_bounds__(kDzThreads) dz_kernel(DzLaunch args) {
  constexpr int VEC = kVec<T>;
  constexpr int kVectors = kDzColumns / VEC;
  // a vector of dZ is 8 bytes (fp32 logits -> half dZ), 16, or two 16-byte stores (half -> fp32)
  constexpr int64_t kStoreAlign = VEC * sizeof(Out) < 16 ? VEC * sizeof(Out) : 16;
  const int tid = threadIdx.x;
  const bool vectorized = rows_aligned(args.z_a, args.ld_za, sizeof(T), kVectorBytes) &&
                          rows_aligned(args.z_b, args.ld_zb, sizeof(T), kVectorBytes) &&
                          rows_aligned(args.dz_a, args.ld_dza, sizeof(Out), kStoreAlign) &&
                          rows_aligned(args.dz_b, args.ld_dzb, sizeof(Out), kStoreAlign);
  const bool need_a = args.dz_a != nullptr, need_b = args.dz_b != nullptr;
  const bool load_b = (args.terms & kLoadB) != 0;
  constexpr int64_t kSpan = int64_t{kDzThreads} * kDzColumns;  // columns per block
  const int64_t col0 = int64_t{blockIdx.x} * kSpan;
  const int64_t col_end = col0 + kSpan < args.vocab ? col0 + kSpan : args.vocab;

  for (int64_t row = blockIdx.y; row < args.rows; row += gridDim.y) {
    const T* za = static_cast<const T*>(args.z_a) + row * args.ld_za;
    const T* zb = load_b ? static_cast<const T*>(args.z_b) + row * args.ld_zb : nullptr;
    Out* dza = need_a ? static_cast<Out*>(args.dz_a) + row * args.ld_dza : nullptr;
    Out* dzb = need_b ? static_cast<Out*>(args.dz_b) + row * args.ld_dzb : nullptr;
    const int64_t target = load_target(args.targets, args.targets_int32, row);
    const RowKind kind = row_kind(target, args.ignore_index, args.vocab);
    DzRow c{};
    float fill = 0.f;  // the whole row's value when it is not valid
    if (kind == RowKind::kValid) {
      c = load_dz_row(row, args.terms, args.lse_a, args.entropy_a, args.lse_b, args.entropy_b, args.kl_ab,
                      args.kl_ba, args.g_logp_a, args.g_entropy_a, args.g_logp_b, args.g_entropy_b, args.g_kl_ab,
                      args.g_kl_ba);
    } else if (kind == RowKind::kBadTarget) {
      fill = quiet_nan();
    }
    const bool valid = kind == RowKind::kValid;

    if (vectorized) {
      // whole vectors of this span; the < VEC columns after the last whole vector belong to the
      // last span (col_end == vocab there) and are done one by one below
      const int64_t vec_end = col0 + (col_end - col0) / VEC * VEC;
      float a[kVectors][VEC], b[kVectors][VEC];
#pragma unroll
      for (int k = 0; k < kVectors; ++k) {
        const int64_t col = col0 + (int64_t{k} * kDzThreads + tid) * VEC;
        if (valid && col < vec_end) {
          load_vector(za + col, args.inv_t, a[k]);
          if (load_b) load_vector(zb + col, args.inv_t, b[k]);
        }
      }
#pragma unroll
      for (int k = 0; k < kVectors; ++k) {
        const int64_t col = col0 + (int64_t{k} * kDzThreads + tid) * VEC;
        if (col >= vec_end) continue;
        float da[VEC], db[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          if (valid) {
            dz_element(c, args.terms, args.inv_t, a[k][i], load_b ? b[k][i] : 0.f, col + i == target, da[i], db[i]);
          } else {
            da[i] = fill;
            db[i] = fill;
          }
        }
        if (need_a) store_vector<Out, VEC>(dza + col, da);
        if (need_b) store_vector<Out, VEC>(dzb + col, db);
      }
      for (int64_t col = vec_end + tid; col < col_end; col += kDzThreads) {
        float da = fill, db = fill;
        if (valid) {
          const float zav = load_scalar(za + col, args.inv_t);
          const float zbv = load_b ? load_scalar(zb + col, args.inv_t) : 0.f;
          dz_element(c, args.terms, args.inv_t, zav, zbv, col == target, da, db);
        }
        if (need_a) dza[col] = from_float<Out>(da);
        if (need_b) dzb[col] = from_float<Out>(db);
      }
    } else {
      for (int64_t col = col0 + tid; col < col_end; col += kDzThreads) {
        float da = fill, db = fill;
        if (valid) {
          const float zav = load_scalar(za + col, args.inv_t);
          const float zbv = load_b ? load_scalar(zb + col, args.inv_t) : 0.f;
          dz_element(c, args.terms, args.inv_t, zav, zbv, col == target, da, db);
        }
        if (need_a) dza[col] = from_float<Out>(da);
        if (need_b) dzb[col] = from_float<Out>(db);
      }
    }
  }
}

}  // namespace

void launch_dz_epilogue(const DzLaunch& args, void* stream) {
  if (args.rows == 0 || (args.dz_a == nullptr && args.dz_b == nullptr)) return;
  with_element_type(args.z_dtype, [&](auto z_zero) {
    with_element_type(args.dz_dtype, [&](auto out_zero) {
      using T = decltype(z_zero);
      using Out = decltype(out_zero);
      constexpr int64_t kSpan = int64_t{kDzThreads} * kDzColumns;
      const dim3 grid(static_cast<unsigned>((args.vocab + kSpan - 1) / kSpan),
                      static_cast<unsigned>(args.rows < 65535 ? args.rows : 65535));
      dz_kernel<T, Out><<<grid, kDzThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
    });
  });
}

}  // namespace papo_kernels::epilogue
