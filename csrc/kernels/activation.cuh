// SiLU-and-mul and the top-k combine: memory-bound elementwise kernels.
//
// Both flatten their output into 16-byte vectors and walk them with a grid-stride loop, so any
// row count fills the GPU. The vector path needs the row length to be a multiple of the vector
// width (then every row start is 16-byte aligned, given an aligned base); other lengths take the
// scalar path, so any hidden size is correct. Math in fp32.
#pragma once

#include <cstdint>

#include "vec.cuh"

namespace moe_ext {

MOE_DEVICE MOE_FORCEINLINE float silu_mul(float gate, float up) { return gate / (1.0f + expf(-gate)) * up; }

// x: [rows, 2 * d] (gate half, then up half); out: [rows, d].
template <typename T, bool kVectorized>
__global__ void silu_and_mul_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t rows, int64_t d) {
  constexpr int kW = kVectorized ? Vec<T>::kSize : 1;
  const int64_t per_row = d / kW;
  const int64_t total = rows * per_row;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row;
    const int64_t c = (i - r * per_row) * kW;
    const T* gate = x + r * 2 * d + c;
    T* o = out + r * d + c;
    if constexpr (kVectorized) {
      const Vec<T> g = load_vec(gate), u = load_vec(gate + d);
      Vec<T> y;
#pragma unroll
      for (int k = 0; k < kW; ++k) y.v[k] = from_float<T>(silu_mul(to_float(g.v[k]), to_float(u.v[k])));
      store_vec(o, y);
    } else {
      *o = from_float<T>(silu_mul(to_float(gate[0]), to_float(gate[d])));
    }
  }
}

// x: [T, topk, H]; weights: [T, topk] fp32 or null; out: [T, H]. Loads of the topk rows are
// unrolled by 4 so several 16-byte loads are in flight per thread.
template <typename T, bool kVectorized>
__global__ void moe_combine_kernel(const T* __restrict__ x, const float* __restrict__ weights, T* __restrict__ out,
                                   int64_t num_tokens, int topk, int64_t h) {
  constexpr int kW = kVectorized ? Vec<T>::kSize : 1;
  const int64_t per_row = h / kW;
  const int64_t total = num_tokens * per_row;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / per_row;
    const int64_t c = (i - t * per_row) * kW;
    const T* src = x + t * topk * h + c;
    float acc[kW] = {};
#pragma unroll 4
    for (int j = 0; j < topk; ++j) {
      const float wj = weights ? weights[t * topk + j] : 1.0f;
      if constexpr (kVectorized) {
        const Vec<T> v = load_vec(src + j * h);
#pragma unroll
        for (int k = 0; k < kW; ++k) acc[k] += wj * to_float(v.v[k]);
      } else {
        acc[0] += wj * to_float(src[j * h]);
      }
    }
    if constexpr (kVectorized) {
      Vec<T> y;
#pragma unroll
      for (int k = 0; k < kW; ++k) y.v[k] = from_float<T>(acc[k]);
      store_vec(out + t * h + c, y);
    } else {
      out[t * h + c] = from_float<T>(acc[0]);
    }
  }
}

}  // namespace moe_ext
