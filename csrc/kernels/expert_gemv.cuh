// Expert GEMVs for decode: the MoE layer straight from topk_ids, without alignment, for token
// counts where each hit expert sees one or a few rows and the layer is a stream of expert weights.
//
//   moe_gemv_silu_kernel:    out[p, n] = silu(a[t] . w13[e, n]) * (a[t] . w13[e, I + n]),  p = t * topk + j
//   moe_gemv_combine_kernel: out[t, n] = sum_j topk_weights[t, j] * (h[t * topk + j] . w2[e_j, n])
//
// One CTA per slot p (silu) or token t (combine) and tile of kWarps * kRows output columns. Each
// warp owns kRows columns and streams their weight rows (silu: a gate and an up row per column;
// combine: one row per column for kSlots of the token's experts at a time) in 16-byte vectors,
// kU vectors per row in flight per lane, with the activation vectors read through L1 (all warps
// of a CTA read the same ones). Products accumulate in fp32 per lane, then one warp sum per
// column. A slot whose id is outside [0, E_route), maps to -1 in expert_map or to a local expert
// outside [0, E) gives a zero row (silu) or no term (combine): every output element is written,
// so outputs need no memset. The combine sums j in order: deterministic, no atomics. Rows whose
// length K is not a multiple of the vector width (or bases not 16-byte aligned) take the scalar
// path, one element per lane-step. Launched with programmatic dependent launch on sm_90 (the
// launcher decides): the SiLU kernel waits for the router, then lets the combine kernel start,
// which asks L2 for its weight rows before it waits for h.
#pragma once

#include <cstdint>
#include <type_traits>

#include "activation.cuh"
#include "vec.cuh"

namespace moe_ext {
namespace gemv {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;

struct Params {
  const void* x;                  // silu: a [M, K]; combine: h [M * topk, K]
  const void* w;                  // silu: w13 [E, 2N, K]; combine: w2 [E, N, K]
  const int32_t* topk_ids;        // [M, topk]
  const float* topk_weights;      // [M, topk] (combine only)
  const int32_t* expert_map;      // [E_route] or null
  void* out;                      // silu: [M * topk, N]; combine: [M, N]
  int topk, N, K, E, E_route;
  bool prefetch;                  // combine: prefetch the weight rows into L2 before waiting on h
};

// Local expert of a routed id, or -1 when the slot contributes nothing here.
MOE_DEVICE MOE_FORCEINLINE int local_expert(int32_t id, const Params& p) {
  if (id < 0 || id >= p.E_route) return -1;
  const int e = p.expert_map != nullptr ? p.expert_map[id] : id;
  return e >= 0 && e < p.E ? e : -1;
}

// Adds to acc[r] this lane's share of rows[r] . xs[r / (kR / kX)] over K elements (rows with
// on[r] false are skipped). kVec: K is a multiple of the vector width and every row and x starts
// 16-byte aligned; lanes then take whole vectors, kU of them per row in flight. Loads are kept
// in their storage type until the products (for bf16/fp16, half the registers of fp32 copies).
template <typename T, int kR, int kX, int kU, bool kVec>
MOE_DEVICE MOE_FORCEINLINE void accumulate(const T* const (&rows)[kR], const T* const (&xs)[kX], const bool (&on)[kR],
                                           int K, float (&acc)[kR]) {
  static_assert(kR % kX == 0, "each x serves the same number of rows");
  constexpr int kRowsPerX = kR / kX;
  // Vectors stay raw 16-byte words from the load to the products, and a load under a condition is a
  // predicated load into zeroed registers: as a Vec<T> of 16-bit elements, the compiler selected element
  // by element, unpacking each vector into eight registers (GPT-OSS's combine tile held 139 of them).
  using Pack = std::conditional_t<kVec, uint4, T>;
  constexpr int kW = kVec ? Vec<T>::kSize : 1;
  const auto load = [](const T* q, bool stream) -> Pack {
    if constexpr (kVec) {
      // Weight rows are read once: evict-first, so they do not push out of L1 the activation vectors
      // every warp of the CTA re-reads.
      return stream ? load16_stream(q) : *reinterpret_cast<const uint4*>(q);
    } else {
      return *q;
    }
  };
  const auto elem = [](const Pack& v, int i) -> float {
    if constexpr (kVec) {
      return to_float(reinterpret_cast<const Vec<T>&>(v).v[i]);
    } else {
      return to_float(v);
    }
  };
  const int steps = K / kW;
  for (int s0 = lane_id(); s0 < steps; s0 += kWarpSize * kU) {
    Pack xv[kU][kX];
    Pack wv[kU][kR];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int s = s0 + u * kWarpSize;
      const bool in = s < steps;
#pragma unroll
      for (int x = 0; x < kX; ++x) {
        xv[u][x] = Pack{};
        if (in) xv[u][x] = load(xs[x] + s * kW, false);
      }
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        wv[u][r] = Pack{};
        if (in && on[r]) wv[u][r] = load(rows[r] + s * kW, true);
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u)
#pragma unroll
      for (int r = 0; r < kR; ++r)
#pragma unroll
        for (int i = 0; i < kW; ++i) acc[r] = fmaf(elem(wv[u][r], i), elem(xv[u][r / kRowsPerX], i), acc[r]);
  }
}

MOE_DEVICE MOE_FORCEINLINE float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += shfl_xor(v, offset);
  return v;
}

// Largest weight row the combine kernel asks L2 to prefetch in one bulk request.
constexpr int64_t kMaxPrefetchRowBytes = int64_t{1} << 20;

// Silu tile: kRows output columns per warp, kU vectors per row in flight.
template <int kRowsT, int kUT>
struct SiluConfig {
  static constexpr int kRows = kRowsT, kU = kUT, kCols = kWarps * kRowsT;
};

// Combine tile: kRows output columns per warp, kSlots of the token's experts at a time; kSplit warps
// per column group, each taking a share of the token's passes over its experts (more warps in flight
// for grids under a wave; see moe_gemv_combine_kernel); kMinBlocksT CTAs a multiprocessor the registers
// must allow, the launch bounds' second value. Keep it >= 1: with none given (0) ptxas aims at fewer
// registers (SiLU config 3: 48 against 72, combine config 5: 58 against 80) and those tiles made the layer
// 3-22% slower (session 27, H200; not profiled). A split grid has twice the CTAs, which fit one wave only
// at 64 registers a thread (8 x 128 threads).
template <int kRowsT, int kSlotsT, int kUT, int kSplitT = 1, int kMinBlocksT = (kSplitT > 1 ? 8 : 1)>
struct CombineConfig {
  static_assert(kWarps % kSplitT == 0, "the split divides the CTA's warps");
  static constexpr int kRows = kRowsT, kSlots = kSlotsT, kU = kUT, kSplit = kSplitT;
  static constexpr int kCols = kWarps / kSplitT * kRowsT;
  static constexpr int kMinBlocks = kMinBlocksT;
};
// Largest topk a split config takes (its shared hand-off holds this many slots); the launcher runs the
// unsplit tile above it.
constexpr int kMaxSplitTopk = 32;

// grid (M * topk, ceil(N / Cfg::kCols)). Launch bounds with one CTA a multiprocessor, as CombineConfig explains.
template <typename T, typename Cfg, bool kVec>
__global__ void __launch_bounds__(kThreads, 1) moe_gemv_silu_kernel(Params p) {
  constexpr int kRows = Cfg::kRows;
  const int slot = blockIdx.x;
  const int lane = lane_id();
  const int n0 = (blockIdx.y * kWarps + static_cast<int>(threadIdx.x) / kWarpSize) * kRows;
  // Launched after the router with programmatic dependent launch (when the launcher can): topk_ids
  // come from it, so wait first; then let the combine kernel start its weight prefetch.
  grid_dependency_wait();
  grid_dependents_launch();
  if (n0 >= p.N) return;  // whole warps leave; no block-wide barrier below
  T* out = static_cast<T*>(p.out) + static_cast<int64_t>(slot) * p.N;
  const int e = local_expert(p.topk_ids[slot], p);
  float g[kRows] = {}, u[kRows] = {};
  if (e >= 0) {
    const T* w = static_cast<const T*>(p.w) + static_cast<int64_t>(e) * 2 * p.N * p.K;
    const T* const xs[1] = {static_cast<const T*>(p.x) + static_cast<int64_t>(slot / p.topk) * p.K};
    const T* rows[2 * kRows];
    bool on[2 * kRows];
    float acc[2 * kRows] = {};
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int n = min(n0 + r, p.N - 1);  // columns past N read a valid row; not stored
      rows[r] = w + static_cast<int64_t>(n) * p.K;
      rows[kRows + r] = w + static_cast<int64_t>(p.N + n) * p.K;
      on[r] = on[kRows + r] = n0 + r < p.N;
    }
    accumulate<T, 2 * kRows, 1, Cfg::kU, kVec>(rows, xs, on, p.K, acc);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      g[r] = warp_sum(acc[r]);
      u[r] = warp_sum(acc[kRows + r]);
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r)
    if (lane == r && n0 + r < p.N) out[n0 + r] = from_float<T>(e >= 0 ? silu_mul(g[r], u[r]) : 0.0f);
}

// grid (M, ceil(N / Cfg::kCols)). With Cfg::kSplit > 1 the kSplit warps of a column group split the
// token's passes over its experts (the first warp the first share, and so on); each later warp hands
// every slot's per-lane partial dot products to the first through shared memory, which folds them into
// its per-lane chain in slot order: the same operations in the same order as one warp doing every pass,
// so every config gives the same bits.
template <typename T, typename Cfg, bool kVec>
__global__ void __launch_bounds__(kThreads, Cfg::kMinBlocks) moe_gemv_combine_kernel(Params p) {
  constexpr int kRows = Cfg::kRows, kSlots = Cfg::kSlots, kR = kRows * kSlots, kSplit = Cfg::kSplit;
  constexpr int kGroups = kWarps / kSplit;
  __shared__ float handoff[kSplit > 1 ? kGroups * kMaxSplitTopk * kRows * kWarpSize : 1];
  const int t = blockIdx.x;
  const int lane = lane_id();
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int share = warp % kSplit, group = warp / kSplit;
  const int n0 = (blockIdx.y * kGroups + group) * kRows;
  const bool valid = n0 < p.N;
  if (kSplit == 1 && !valid) return;  // whole warps; a split CTA keeps them all for its barrier
  const int passes = (p.topk + kSlots - 1) / kSlots;
  const int per_share = (passes + kSplit - 1) / kSplit;
  const int pass_begin = share * per_share, pass_end = min(passes, pass_begin + per_share);
  const T* w = static_cast<const T*>(p.w);
  const T* h = static_cast<const T*>(p.x);
  // Before waiting on the kernel ahead (moe_gemv_silu, which writes h), ask L2 for this warp's
  // weight rows (when the launcher found all of them fit in L2: else they evict each other before
  // use and are read twice): they do not depend on it. topk_ids are complete by now when that kernel waited
  // on the router before letting this one start (moe_gemv_silu does); read earlier, they could
  // only name the wrong rows to prefetch, never change a result (ids are range-checked).
  if (kVec && valid && p.prefetch &&
      static_cast<int64_t>(p.K) * static_cast<int64_t>(sizeof(T)) <= kMaxPrefetchRowBytes) {
    const unsigned row_bytes = static_cast<unsigned>(p.K) * static_cast<unsigned>(sizeof(T));
    for (int j = pass_begin * kSlots + lane; j < min(p.topk, pass_end * kSlots); j += kWarpSize) {
      const int e = local_expert(p.topk_ids[static_cast<int64_t>(t) * p.topk + j], p);
      if (e < 0) continue;
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        if (n0 + r < p.N) prefetch_l2(w + (static_cast<int64_t>(e) * p.N + n0 + r) * p.K, row_bytes);
    }
  }
  grid_dependency_wait();
  float acc[kRows] = {};
  for (int pass = pass_begin; pass < pass_end; ++pass) {
    const int j0 = pass * kSlots;
    const T* rows[kR];
    const T* xs[kSlots];
    bool on[kR];
    float weight[kSlots];
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const int j = j0 + s;
      const int64_t slot = static_cast<int64_t>(t) * p.topk + j;
      const int e = j < p.topk ? local_expert(p.topk_ids[slot], p) : -1;
      weight[s] = e >= 0 ? p.topk_weights[slot] : 0.0f;
      xs[s] = h + (e >= 0 ? slot : 0) * p.K;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int n = min(n0 + r, p.N - 1);
        rows[s * kRows + r] = w + (static_cast<int64_t>(e >= 0 ? e : 0) * p.N + n) * p.K;
        on[s * kRows + r] = valid && e >= 0 && n0 + r < p.N;
      }
    }
    float part[kR] = {};
    accumulate<T, kR, kSlots, Cfg::kU, kVec>(rows, xs, on, p.K, part);
    if (share == 0) {
#pragma unroll
      for (int s = 0; s < kSlots; ++s)
#pragma unroll
        for (int r = 0; r < kRows; ++r) acc[r] = fmaf(weight[s], part[s * kRows + r], acc[r]);
    } else {
#pragma unroll
      for (int s = 0; s < kSlots; ++s)
#pragma unroll
        for (int r = 0; r < kRows; ++r)
          if (j0 + s < p.topk)
            handoff[((group * kMaxSplitTopk + j0 + s) * kRows + r) * kWarpSize + lane] = part[s * kRows + r];
    }
  }
  if constexpr (kSplit > 1) {
    __syncthreads();  // the later shares' partials
    if (share != 0) return;
    // The first share's chain goes on over the later shares' slots, including the tail of the last
    // pass past topk (weight 0, partial 0), as one warp doing every pass would.
    for (int j = per_share * kSlots; j < passes * kSlots; ++j) {
      const int64_t slot = static_cast<int64_t>(t) * p.topk + j;
      const bool in = j < p.topk;
      const float weight = in && local_expert(p.topk_ids[slot], p) >= 0 ? p.topk_weights[slot] : 0.0f;
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        acc[r] = fmaf(weight, in ? handoff[((group * kMaxSplitTopk + j) * kRows + r) * kWarpSize + lane] : 0.0f,
                      acc[r]);
    }
    if (!valid) return;
  }
  T* out = static_cast<T*>(p.out) + static_cast<int64_t>(t) * p.N;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float v = warp_sum(acc[r]);
    if (lane == r && n0 + r < p.N) out[n0 + r] = from_float<T>(v);
  }
}

}  // namespace gemv
}  // namespace moe_ext
