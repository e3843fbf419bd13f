// Element conversion and 16-byte vectors for the CUDA kernels. Conversions are explicit because
// torch's build defines __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../core/compat.h"

namespace moe_ext {

MOE_DEVICE MOE_FORCEINLINE float to_float(float v) { return v; }
MOE_DEVICE MOE_FORCEINLINE float to_float(__half v) { return __half2float(v); }
MOE_DEVICE MOE_FORCEINLINE float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
MOE_DEVICE MOE_FORCEINLINE T from_float(float v);
template <>
MOE_DEVICE MOE_FORCEINLINE float from_float<float>(float v) { return v; }
template <>
MOE_DEVICE MOE_FORCEINLINE __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
MOE_DEVICE MOE_FORCEINLINE __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// kVecBytes of T, loaded and stored as one 16-byte access.
constexpr int kVecBytes = 16;

template <typename T>
struct alignas(kVecBytes) Vec {
  static constexpr int kSize = kVecBytes / static_cast<int>(sizeof(T));
  T v[kSize];
};

// Evict-first 16-byte accesses, for bytes read or written once (weights streamed past L1, a combine's
// inputs): ld.global.cs / st.global.cs on NVIDIA, plain accesses on AMD.
MOE_DEVICE MOE_FORCEINLINE uint4 load16_stream(const void* p) {
#if defined(__HIP_PLATFORM_AMD__)
  return *reinterpret_cast<const uint4*>(p);
#else
  return __ldcs(reinterpret_cast<const uint4*>(p));
#endif
}
MOE_DEVICE MOE_FORCEINLINE void store16_stream(void* p, uint4 v) {
#if defined(__HIP_PLATFORM_AMD__)
  *reinterpret_cast<uint4*>(p) = v;
#else
  __stcs(reinterpret_cast<uint4*>(p), v);
#endif
}

// One vector as a 16-byte access; kStream: evict-first (above).
template <bool kStream = false, typename T>
MOE_DEVICE MOE_FORCEINLINE Vec<T> load_vec(const T* p) {
  Vec<T> r;
  if constexpr (kStream) {
    *reinterpret_cast<uint4*>(&r) = load16_stream(p);
  } else {
    *reinterpret_cast<uint4*>(&r) = *reinterpret_cast<const uint4*>(p);
  }
  return r;
}

template <bool kStream = false, typename T>
MOE_DEVICE MOE_FORCEINLINE void store_vec(T* p, const Vec<T>& v) {
  if constexpr (kStream) {
    store16_stream(p, *reinterpret_cast<const uint4*>(&v));
  } else {
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&v);
  }
}

}  // namespace moe_ext
