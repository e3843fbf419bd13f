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

// Multiprocessor count of a device, read once per device.
inline int num_sms(c10::DeviceIndex device) {
  static int cache[64] = {};
  int& n = cache[device & 63];
  if (n == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

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

}  // namespace moe_ext
