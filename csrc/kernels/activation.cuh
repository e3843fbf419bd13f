// SiLU-and-mul and the top-k combine: memory-bound elementwise kernels.
//
// Blocks stride over rows and threads over each row's 16-byte vectors (no index division per
// element). The vector path needs the row length to be a multiple of the vector
// width (then every row start is 16-byte aligned, given an aligned base); other lengths take the
// scalar path, so any hidden size is correct. Math in fp32. Both kernels let a kernel queued behind
// them with programmatic dependent launch start at once, and wait for the kernel ahead of them before
// their first load (csrc/core/compat.h), so their launch and ramp overlap the kernel before.
#pragma once

#include <cstdint>

#include "vec.cuh"

namespace moe_ext {

MOE_DEVICE MOE_FORCEINLINE float silu_mul(float gate, float up) { return gate / (1.0f + expf(-gate)) * up; }

// x: [rows, 2 * d] (gate half, then up half); out: [rows, d]. Blocks stride over rows, threads
// over a row's vectors: no per-element index division.
template <typename T, bool kVectorized>
__global__ void silu_and_mul_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t rows, int64_t d) {
  constexpr int kW = kVectorized ? Vec<T>::kSize : 1;
  const int per_row = static_cast<int>(d / kW);
  grid_dependents_launch();
  grid_dependency_wait();
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* gate = x + r * 2 * d;
    T* o = out + r * d;
#pragma unroll 2
    for (int c = threadIdx.x; c < per_row; c += blockDim.x) {
      if constexpr (kVectorized) {
        const Vec<T> g = load_vec(gate + c * kW), u = load_vec(gate + d + c * kW);
        Vec<T> y;
#pragma unroll
        for (int k = 0; k < kW; ++k) y.v[k] = from_float<T>(silu_mul(to_float(g.v[k]), to_float(u.v[k])));
        store_vec(o + c * kW, y);
      } else {
        o[c] = from_float<T>(silu_mul(to_float(gate[c]), to_float(gate[d + c])));
      }
    }
  }
}

// x: [T, topk, H]; weights: [T, topk] fp32 or null; out: [T, H]. Blocks stride over tokens, threads
// over the row's vectors; the topk loads are unrolled by 8 so all of them (topk <= 8) are in flight.
template <typename T, bool kVectorized>
__global__ void moe_combine_kernel(const T* __restrict__ x, const float* __restrict__ weights, T* __restrict__ out,
                                   int64_t num_tokens, int topk, int64_t h) {
  constexpr int kW = kVectorized ? Vec<T>::kSize : 1;
  const int per_row = static_cast<int>(h / kW);
  grid_dependents_launch();
  grid_dependency_wait();
  for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    const T* src = x + t * topk * h;
    for (int c = threadIdx.x; c < per_row; c += blockDim.x) {
      float acc[kW] = {};
#pragma unroll 8
      for (int j = 0; j < topk; ++j) {
        const float wj = weights ? weights[t * topk + j] : 1.0f;
        if constexpr (kVectorized) {
          const Vec<T> v = load_vec(src + j * h + c * kW);
#pragma unroll
          for (int k = 0; k < kW; ++k) acc[k] += wj * to_float(v.v[k]);
        } else {
          acc[0] += wj * to_float(src[j * h + c]);
        }
      }
      if constexpr (kVectorized) {
        Vec<T> y;
#pragma unroll
        for (int k = 0; k < kW; ++k) y.v[k] = from_float<T>(acc[k]);
        store_vec(out + t * h + c * kW, y);
      } else {
        out[t * h + c] = from_float<T>(acc[0]);
      }
    }
  }
}

}  // namespace moe_ext
