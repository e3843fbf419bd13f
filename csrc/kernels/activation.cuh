// SiLU-and-mul and the top-k combine: memory-bound elementwise kernels.
//
// Blocks stride over rows and threads over each row's 16-byte vectors (no index division per
// element); each thread issues the loads of several (row, vector) steps before their math (RowWalk).
// The vector path needs the row length to be a multiple of the vector width (then every row start
// is 16-byte aligned, given an aligned base); other lengths take the scalar path, so any hidden size
// is correct. Math in fp32. Both kernels let a kernel queued behind them with programmatic dependent
// launch start at once, and wait for the kernel ahead of them before their first load
// (csrc/core/compat.h), so their launch and ramp overlap the kernel before.
#pragma once

#include <cstdint>
#include <type_traits>

#include "vec.cuh"

namespace moe_ext {

// SiLU(gate) * up in fp32. kExact: expf and an IEEE division (fp32 outputs, and the GEMM and GEMV
// epilogues). Otherwise ex2.approx and rcp.approx, a few ulp of fp32 off (far under the 2^-9 of a
// 16-bit output), with no division branch: the exact division's slow-path branch serialized each
// element's chain and split the 16-byte stores (session 13, bench/NOTES.md silu_and_mul v4). Both
// give -0 below gate ~ -88, NaN for a NaN input, and +inf * up at +inf.
template <bool kExact = true>
MOE_DEVICE MOE_FORCEINLINE float silu_mul(float gate, float up) {
  if constexpr (kExact) {
    return gate / (1.0f + expf(-gate)) * up;
  } else {
    return __fdividef(gate, 1.0f + __expf(-gate)) * up;
  }
}

// One thread's walk over rows blockIdx.x, blockIdx.x + gridDim.x, ... and, in each, over vectors
// threadIdx.x, threadIdx.x + blockDim.x, ... of the row (no index division). The kernels take
// kItems steps at a time, issuing every load of them before any math, so a thread keeps all its
// loads in flight whether a row takes it one pass or several.
struct RowWalk {
  int64_t row;
  int col;
  MOE_DEVICE MOE_FORCEINLINE void next(int per_row) {
    col += blockDim.x;
    if (col >= per_row) {
      col = threadIdx.x;
      row += gridDim.x;
    }
  }
};

// Raw 16 bytes of kVecBytes / sizeof(T) elements (vectorized) or one element, loaded
// unconditionally: a predicated load into a Vec<T> of 16-bit elements made the compiler wait for
// each load and merge it element by element (session 13's SASS), so the kernels clamp the address
// of a step past the end instead and skip its math. kStream: the vector load marked evict-first
// (ld.global.cs; the scalar path loads plainly).
template <typename T, bool kVectorized>
struct Raw {
  using type = std::conditional_t<kVectorized, uint4, T>;
  template <bool kStream = false>
  static MOE_DEVICE MOE_FORCEINLINE type load(const T* p) {
    if constexpr (kStream && kVectorized) return load16_stream(p);
    return *reinterpret_cast<const type*>(p);
  }
  static MOE_DEVICE MOE_FORCEINLINE float at(const type& r, int k) {
    if constexpr (kVectorized) {
      return to_float(reinterpret_cast<const Vec<T>&>(r).v[k]);
    } else {
      return to_float(r);
    }
  }
};

template <typename T, bool kVectorized, bool kStream = false>
MOE_DEVICE MOE_FORCEINLINE void store_out(T* p, const Vec<T>& y) {
  if constexpr (kVectorized) {
    store_vec<kStream>(p, y);
  } else {
    p[0] = y.v[0];
  }
}

// x: [rows, 2 * d] (gate half, then up half); out: [rows, d]. A thread loads kItems (row, vector)
// steps before their math.
template <typename T, bool kVectorized, int kItems>
__global__ void silu_and_mul_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t rows, int64_t d) {
  using R = Raw<T, kVectorized>;
  constexpr int kW = kVectorized ? Vec<T>::kSize : 1;
  constexpr bool kExact = sizeof(T) == 4;
  const int per_row = static_cast<int>(d / kW);
  grid_dependents_launch();
  grid_dependency_wait();
  if (static_cast<int>(threadIdx.x) >= per_row) return;  // no barriers below
  RowWalk walk{blockIdx.x, static_cast<int>(threadIdx.x)};
  while (walk.row < rows) {
    int64_t at[kItems];  // offset of the step's output in out; -1 past the last row
    typename R::type g[kItems], u[kItems];
#pragma unroll
    for (int q = 0; q < kItems; ++q) {
      const bool ok = walk.row < rows;
      at[q] = ok ? walk.row * d + int64_t(walk.col) * kW : -1;
      const T* gate = ok ? x + walk.row * 2 * d + int64_t(walk.col) * kW : x;
      g[q] = R::load(gate);
      u[q] = R::load(gate + (ok ? d : 0));
      walk.next(per_row);
    }
#pragma unroll
    for (int q = 0; q < kItems; ++q) {
      if (at[q] < 0) continue;
      Vec<T> y;
#pragma unroll
      for (int k = 0; k < kW; ++k) y.v[k] = from_float<T>(silu_mul<kExact>(R::at(g[q], k), R::at(u[q], k)));
      store_out<T, kVectorized>(out + at[q], y);
    }
  }
}

// x: [T, topk, H]; weights: [T, topk] fp32 or null; out: [T, H]. Blocks stride over tokens, threads
// over the row's vectors. A thread takes kItems (token, vector) steps at a time and loads kChunk of
// each step's topk rows before any math (kChunk * kItems loads in flight), then adds them in j order.
// The launcher picks kChunk and kItems from topk. kStream: x loaded and out stored evict-first
// (.cs), for the launcher's topk > 4 instance (bench/NOTES.md moe_combine, session 14).
template <typename T, bool kVectorized, int kChunk, int kItems, bool kStream = false>
__global__ void moe_combine_kernel(const T* __restrict__ x, const float* __restrict__ weights, T* __restrict__ out,
                                   int64_t num_tokens, int topk, int64_t h) {
  using R = Raw<T, kVectorized>;
  constexpr int kW = kVectorized ? Vec<T>::kSize : 1;
  const int per_row = static_cast<int>(h / kW);
  grid_dependents_launch();
  grid_dependency_wait();
  if (static_cast<int>(threadIdx.x) >= per_row) return;  // no barriers below
  RowWalk walk{blockIdx.x, static_cast<int>(threadIdx.x)};
  while (walk.row < num_tokens) {
    int64_t t[kItems];  // -1 past the last token
    int col[kItems];
#pragma unroll
    for (int q = 0; q < kItems; ++q) {
      t[q] = walk.row < num_tokens ? walk.row : -1;
      col[q] = walk.col;
      walk.next(per_row);
    }
    float acc[kItems][kW] = {};
#pragma unroll 1
    for (int j0 = 0; j0 < topk; j0 += kChunk) {
      typename R::type v[kItems][kChunk];
      float w[kItems][kChunk];
#pragma unroll
      for (int q = 0; q < kItems; ++q) {
#pragma unroll
        for (int c = 0; c < kChunk; ++c) {
          const bool ok = t[q] >= 0 && j0 + c < topk;
          const int64_t row = ok ? t[q] * topk + j0 + c : 0;  // row 0: a valid address, its value unused
          v[q][c] = R::template load<kStream>(x + row * h + (ok ? int64_t(col[q]) * kW : 0));
          w[q][c] = weights ? weights[row] : 1.0f;
        }
      }
#pragma unroll
      for (int q = 0; q < kItems; ++q) {
#pragma unroll
        for (int c = 0; c < kChunk; ++c) {
          if (t[q] < 0 || j0 + c >= topk) continue;
#pragma unroll
          for (int k = 0; k < kW; ++k) acc[q][k] += w[q][c] * R::at(v[q][c], k);
        }
      }
    }
#pragma unroll
    for (int q = 0; q < kItems; ++q) {
      if (t[q] < 0) continue;
      Vec<T> y;
#pragma unroll
      for (int k = 0; k < kW; ++k) y.v[k] = from_float<T>(acc[q][k]);
      store_out<T, kVectorized, kStream>(out + t[q] * h + int64_t(col[q]) * kW, y);
    }
  }
}

}  // namespace moe_ext
