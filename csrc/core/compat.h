// CUDA / HIP compatibility layer: the only place that spells the warp size, the shuffle intrinsics
// and lane-mask widths. Kernels include this header and never use __shfl_*_sync or 32 directly, so
// the HIP port is a build change (hipcc defines __HIP_PLATFORM_AMD__ and the wavefront is 64 lanes).
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MOE_HOST_DEVICE __host__ __device__
#define MOE_DEVICE __device__
#define MOE_FORCEINLINE __forceinline__
#else
#define MOE_HOST_DEVICE
#define MOE_DEVICE
#define MOE_FORCEINLINE inline
#endif

#if defined(__HIP_PLATFORM_AMD__)
#include <hip/hip_cooperative_groups.h>
#include <hip/hip_runtime.h>
#define MOE_WARP_SIZE 64
using moe_lane_mask_t = unsigned long long;
#define MOE_FULL_LANE_MASK (~0ull)
using moeStream_t = hipStream_t;
using moeError_t = hipError_t;
#define moeSuccess hipSuccess
#define moeGetLastError hipGetLastError
#define moeGetErrorString hipGetErrorString
#else
#define MOE_WARP_SIZE 32
using moe_lane_mask_t = unsigned int;
#define MOE_FULL_LANE_MASK 0xffffffffu
#if defined(__CUDACC__)
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#endif
#endif

namespace moe_ext {

// Compile-time warp size; kernels size their loops and shared arrays from it.
constexpr int kWarpSize = MOE_WARP_SIZE;

// A lane mask with bit `lane` set, of the platform's mask width (64-bit on AMD).
MOE_HOST_DEVICE MOE_FORCEINLINE moe_lane_mask_t lane_bit(int lane) {
  return static_cast<moe_lane_mask_t>(1) << lane;
}

#if defined(__CUDACC__) || defined(__HIPCC__)
template <typename T>
MOE_DEVICE MOE_FORCEINLINE T shfl_xor(T v, int lane_mask, int width = kWarpSize) {
#if defined(__HIP_PLATFORM_AMD__)
  return __shfl_xor(v, lane_mask, width);
#else
  return __shfl_xor_sync(MOE_FULL_LANE_MASK, v, lane_mask, width);
#endif
}

template <typename T>
MOE_DEVICE MOE_FORCEINLINE T shfl(T v, int src_lane, int width = kWarpSize) {
#if defined(__HIP_PLATFORM_AMD__)
  return __shfl(v, src_lane, width);
#else
  return __shfl_sync(MOE_FULL_LANE_MASK, v, src_lane, width);
#endif
}

template <typename T>
MOE_DEVICE MOE_FORCEINLINE T shfl_up(T v, unsigned delta, int width = kWarpSize) {
#if defined(__HIP_PLATFORM_AMD__)
  return __shfl_up(v, delta, width);
#else
  return __shfl_up_sync(MOE_FULL_LANE_MASK, v, delta, width);
#endif
}

MOE_DEVICE MOE_FORCEINLINE moe_lane_mask_t ballot(bool pred) {
#if defined(__HIP_PLATFORM_AMD__)
  return __ballot(pred);
#else
  return __ballot_sync(MOE_FULL_LANE_MASK, pred);
#endif
}

// Whether any lane of the warp holds pred (warp-uniform result).
MOE_DEVICE MOE_FORCEINLINE bool any_lane(bool pred) {
#if defined(__HIP_PLATFORM_AMD__)
  return __any(pred);
#else
  return __any_sync(MOE_FULL_LANE_MASK, pred);
#endif
}

MOE_DEVICE MOE_FORCEINLINE int lane_id() { return static_cast<int>(threadIdx.x) & (kWarpSize - 1); }

MOE_DEVICE MOE_FORCEINLINE int popcount(moe_lane_mask_t m) {
#if defined(__HIP_PLATFORM_AMD__)
  return __popcll(m);
#else
  return __popc(m);
#endif
}

// Lanes below this one.
MOE_DEVICE MOE_FORCEINLINE moe_lane_mask_t lanemask_lt() { return lane_bit(lane_id()) - 1; }

// Lanes of the warp holding the same value as this lane (every lane must call). `kBits` bounds the
// value's width for the portable ballot-per-bit form; -1 is allowed (all bits set).
template <int kBits>
MOE_DEVICE MOE_FORCEINLINE moe_lane_mask_t match_any(int v) {
#if defined(__HIP_PLATFORM_AMD__)
  moe_lane_mask_t peers = MOE_FULL_LANE_MASK;
#pragma unroll
  for (int b = 0; b < kBits; ++b) {
    const bool bit = (v >> b) & 1;
    const moe_lane_mask_t set = ballot(bit);
    peers &= bit ? set : ~set;
  }
  return peers;
#else
  return __match_any_sync(MOE_FULL_LANE_MASK, v);
#endif
}

// Max of an unsigned 32-bit value over each group of `width` lanes (a power of two, at most the
// warp; every lane must call): one REDUX instruction on sm_80+ when the group is the whole warp,
// an xor butterfly otherwise.
template <int kWidth = kWarpSize>
MOE_DEVICE MOE_FORCEINLINE unsigned warp_max_u32(unsigned v) {
  static_assert(kWidth > 0 && kWidth <= kWarpSize && (kWidth & (kWidth - 1)) == 0, "width: a power of two <= warp");
#if !defined(__HIP_PLATFORM_AMD__) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr bool kRedux = kWidth == kWarpSize;
#else
  constexpr bool kRedux = false;
#endif
  if constexpr (kRedux) {
    return __reduce_max_sync(MOE_FULL_LANE_MASK, v);
  } else {
#pragma unroll
    for (int offset = kWidth / 2; offset > 0; offset /= 2) {
      const unsigned o = shfl_xor(v, offset, kWidth);
      v = o > v ? o : v;
    }
    return v;
  }
}

// Inclusive prefix sum over the warp's lanes (every lane must call).
template <typename T>
MOE_DEVICE MOE_FORCEINLINE T warp_inclusive_scan(T v) {
  const int lane = lane_id();
#pragma unroll
  for (int d = 1; d < kWarpSize; d *= 2) {
    const T o = shfl_up(v, d);
    if (lane >= d) v += o;
  }
  return v;
}

// Programmatic dependent launch (sm_90+; no-ops elsewhere and on HIP). A kernel launched with the
// programmatic-serialization attribute may start before the kernel ahead of it in the stream has
// finished, once every block of that kernel has called grid_dependents_launch() (or exited);
// grid_dependency_wait() then blocks until that kernel has completed and its writes are visible.
// Nothing the previous kernel writes may be read before the wait.
MOE_DEVICE MOE_FORCEINLINE void grid_dependency_wait() {
#if !defined(__HIP_PLATFORM_AMD__) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

MOE_DEVICE MOE_FORCEINLINE void grid_dependents_launch() {
#if !defined(__HIP_PLATFORM_AMD__) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Starts pulling [p, p + bytes) into L2 (sm_90+ bulk prefetch; p 16-byte aligned, bytes a multiple
// of 16, the range inside one allocation). A hint: nothing comes back to the thread.
MOE_DEVICE MOE_FORCEINLINE void prefetch_l2(const void* p, unsigned bytes) {
#if !defined(__HIP_PLATFORM_AMD__) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#endif
}

// Barrier across the whole grid, with the memory of every block's writes before it visible to every
// block after it. Only in a kernel launched cooperatively (every block resident at once).
MOE_DEVICE MOE_FORCEINLINE void grid_sync() { cooperative_groups::this_grid().sync(); }

// acc + the four bytes of w, each read as unsigned (one IDP4A on sm_61+).
MOE_DEVICE MOE_FORCEINLINE int add_bytes(uint32_t w, int acc) {
#if !defined(__HIP_PLATFORM_AMD__) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 610
  return static_cast<int>(__dp4a(w, 0x01010101u, static_cast<unsigned>(acc)));
#else
  return acc + static_cast<int>((w & 0xff) + (w >> 8 & 0xff) + (w >> 16 & 0xff) + (w >> 24));
#endif
}

MOE_DEVICE MOE_FORCEINLINE void sync_warp() {
#if !defined(__HIP_PLATFORM_AMD__)
  __syncwarp();
#endif
}
#endif

}  // namespace moe_ext
