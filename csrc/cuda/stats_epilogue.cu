// The statistics epilogue of the workspace path in CUDA: per row of a chunk's logits, lse, logp,
// entropy and (two views) both KLs, from one pass over the row (epilogue_math.h has the math).
//
// Layout (why: epilogue_math.h, "geometry"): one block of kStatsThreads threads per row, both
// views' rows together (the KL sums need z_a and z_b of the same column). Each thread folds its
// columns into private online sums (fold_thread_columns: 16-byte loads, kStatsLoadBatch vectors
// per view in flight, the max raised once per vector), then the block merges the 256 partial sums
// with warp shuffles and one exchange through shared memory; thread 0 loads the target logit and
// writes the row's outputs. Rows whose target is ignore_index (outputs 0) or outside [0, V)
// (outputs NaN) are finished without reading their logits.
#include "epilogue_device.cuh"

namespace papo_kernels::epilogue {
namespace {

template <typename T>
struct RowLoad {
  const T* za;
  const T* zb;  // nullptr for one view
  float inv_t;

  __device__ __forceinline__ void vec(int64_t col, float (&a)[kVec<T>], float (&b)[kVec<T>]) const {
    load_vector(za + col, inv_t, a);
    if (zb != nullptr) load_vector(zb + col, inv_t, b);
  }
  __device__ __forceinline__ void one(int64_t col, float& a, float& b) const {
    a = load_scalar(za + col, inv_t);
    if (zb != nullptr) b = load_scalar(zb + col, inv_t);
  }
};

__device__ __forceinline__ RowSums shuffle_xor(const RowSums& r, int offset, bool two) {
  constexpr unsigned kAll = 0xffffffffu;
  RowSums o;
  o.a.m = __shfl_xor_sync(kAll, r.a.m, offset);
  o.a.s = __shfl_xor_sync(kAll, r.a.s, offset);
  o.a.u = __shfl_xor_sync(kAll, r.a.u, offset);
  o.x_ab = 0.f;
  o.b = r.b;
  o.x_ba = 0.f;
  if (two) {  // block-uniform
    o.b.m = __shfl_xor_sync(kAll, r.b.m, offset);
    o.b.s = __shfl_xor_sync(kAll, r.b.s, offset);
    o.b.u = __shfl_xor_sync(kAll, r.b.u, offset);
    o.x_ab = __shfl_xor_sync(kAll, r.x_ab, offset);
    o.x_ba = __shfl_xor_sync(kAll, r.x_ba, offset);
  }
  return o;
}

// The merge order is butterfly_reference's (epilogue_math.h), which the host reference replays.
__device__ __forceinline__ void butterfly(RowSums& r, int first_offset, bool two) {
  for (int offset = first_offset; offset >= 1; offset /= 2) merge(r, shuffle_xor(r, offset, two), two);
}

template <typename T>
__global__ void __launch_bounds__(kStatsThreads, kStatsBlocksPerSm) stats_kernel(StatsLaunch args) {
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const bool two = args.z_b != nullptr;
  const int64_t target = load_target(args.targets, args.targets_int32, row);
  const RowKind kind = row_kind(target, args.ignore_index, args.vocab);
  if (kind != RowKind::kValid) {  // the whole block takes this branch: no barrier is skipped
    if (tid < (two ? 8 : 3)) args.out[tid][row] = kind == RowKind::kIgnored ? 0.f : quiet_nan();
    return;
  }
  const T* za = static_cast<const T*>(args.z_a) + row * args.ld_a;
  const T* zb = two ? static_cast<const T*>(args.z_b) + row * args.ld_b : nullptr;
  // every row start 16-byte aligned (checked by the launcher for the whole chunk)
  const bool vectorized = rows_aligned(args.z_a, args.ld_a, sizeof(T), kVectorBytes) &&
                          rows_aligned(args.z_b, args.ld_b, sizeof(T), kVectorBytes);
  RowSums r = empty_sums();
  fold_thread_columns<kVec<T>>(r, RowLoad<T>{za, zb, args.inv_t}, args.vocab, tid, vectorized, two);

  __shared__ RowSums warp_totals[kStatsWarps];
  const int lane = tid % kWarpSize, warp = tid / kWarpSize;
  butterfly(r, kWarpSize / 2, two);
  if (lane == 0) warp_totals[warp] = r;
  __syncthreads();
  if (warp != 0) return;
  r = lane < kStatsWarps ? warp_totals[lane] : empty_sums();
  butterfly(r, kStatsWarps / 2, two);
  if (lane != 0) return;

  const float zy_a = load_scalar(za + target, args.inv_t);
  const float zy_b = two ? load_scalar(zb + target, args.inv_t) : 0.f;
  const RowStatsOut o = finish_row(r, zy_a, zy_b, two);
  args.out[0][row] = o.logp_a;
  args.out[1][row] = o.entropy_a;
  args.out[2][row] = o.lse_a;
  if (two) {
    args.out[3][row] = o.logp_b;
    args.out[4][row] = o.entropy_b;
    args.out[5][row] = o.lse_b;
    args.out[6][row] = o.kl_ab;
    args.out[7][row] = o.kl_ba;
  }
}

}  // namespace

void launch_stats_epilogue(const StatsLaunch& args, void* stream) {
  if (args.rows == 0) return;
  with_element_type(args.dtype, [&](auto zero) {
    using T = decltype(zero);
    stats_kernel<T><<<static_cast<unsigned>(args.rows), kStatsThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
  });
}

#define PAPO_STRINGIFY_(...) #__VA_ARGS__
#define PAPO_STRINGIFY(...) PAPO_STRINGIFY_(__VA_ARGS__)

const char* compiled_cuda_archs() {
#ifdef __CUDA_ARCH_LIST__
  // nvcc defines the list (e.g. 800,900) in the host pass too
  return PAPO_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

}  // namespace papo_kernels::epilogue
