// Helpers shared by the CUDA adapters (g++-compiled, torch-facing).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cstdlib>

#include "../core/validate.h"
#include "../kernels/dtype.h"

namespace moe_ext {

inline DType to_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return DType::kFloat32;
    case c10::ScalarType::Half: return DType::kFloat16;
    case c10::ScalarType::BFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "moe_ext: unsupported dtype ", c10::toString(t));
  }
}

// A device attribute, queried once per device and attribute (the cache holds value + 1, so 0 means
// not yet asked and zero-valued attributes such as a compute capability's minor are cached too).
template <cudaDeviceAttr kAttr>
inline int device_attribute(c10::DeviceIndex device) {
  static int cache[64] = {};
  int& c = cache[device & 63];
  if (c == 0) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, kAttr, device));
    c = v + 1;
  }
  return c - 1;
}

inline int num_sms(c10::DeviceIndex device) { return device_attribute<cudaDevAttrMultiProcessorCount>(device); }
inline int compute_major(c10::DeviceIndex device) {
  return device_attribute<cudaDevAttrComputeCapabilityMajor>(device);
}
// major * 10 + minor: 80 for sm_80, 90 for sm_90.
inline int compute_capability(c10::DeviceIndex device) {
  return compute_major(device) * 10 + device_attribute<cudaDevAttrComputeCapabilityMinor>(device);
}
inline int64_t l2_bytes(c10::DeviceIndex device) { return device_attribute<cudaDevAttrL2CacheSize>(device); }

// The config index from environment variable `env` (n configs), -1 when unset.
inline int config_override(const char* op, const char* env, int n) {
  const char* s = std::getenv(env);
  if (s == nullptr || *s == '\0') return -1;
  char* end = nullptr;
  const long v = std::strtol(s, &end, 10);
  MOE_CHECK_VALUE(*end == '\0' && v >= -1 && v < n, "moe_ext.", op, ": ", env, " must be an integer in [-1, ", n,
                  "), got \"", s, "\"");
  return static_cast<int>(v);
}

// Whether to launch with programmatic dependent launch: the device is sm_90+ and MOE_EXT_PDL is not
// "0" (read on every call, for A/B timing within one process).
inline bool use_pdl(c10::DeviceIndex device) {
  const char* s = std::getenv("MOE_EXT_PDL");
  return compute_major(device) >= 9 && !(s != nullptr && s[0] == '0' && s[1] == '\0');
}

}  // namespace moe_ext
