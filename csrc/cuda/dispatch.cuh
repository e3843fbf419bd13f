// Launch-side helpers (nvcc only): switches from runtime values to template instances, and the
// dynamic shared-memory opt-in.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <type_traits>
#include <utility>

#include "../kernels/dtype.h"

namespace moe_ext::cuda {

// Calls f with a value of the element type named by dtype: f(float{}), f(__half{}) or
// f(__nv_bfloat16{}).
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Calls f(Cfgs{}...[index]): a runtime index into a table of config types (tile shapes), the way
// dispatch_dtype maps a dtype to a type. cudaErrorInvalidValue for an index outside the table.
template <typename... Cfgs, typename F>
cudaError_t dispatch_config(int index, F&& f) {
  cudaError_t err = cudaErrorInvalidValue;
  int i = 0;
  (void)((i++ == index ? (err = f(Cfgs{}), true) : false) || ...);
  return err;
}

// Calls f(std::integral_constant<decltype(kV), kV>{}) for the kV of kValues equal to the runtime `value` (an enum
// to the template instance that holds it), as dispatch_config does for an index into a table of types; a bool
// flag takes BOOL_SWITCH (csrc/core/static_switch.h). cudaErrorInvalidValue where none matches.
template <auto... kValues, typename V, typename F>
cudaError_t dispatch_value(V value, F&& f) {
  cudaError_t err = cudaErrorInvalidValue;
  (void)((value == kValues ? (err = f(std::integral_constant<decltype(kValues), kValues>{}), true) : false) || ...);
  return err;
}

// Opts kKernel in to `bytes` of dynamic shared memory when that is over the default 48 KiB. The
// grant is remembered per kernel instance (the template argument: every instance of one kernel has
// the same function-pointer type, so a cache keyed on the type would be shared) and device, so the
// driver is called once, not on every launch. It is a function attribute, not a stream operation:
// allowed while a graph is being captured.
template <auto kKernel>
cudaError_t allow_dynamic_smem(size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  static std::atomic<size_t> granted[64];
  int dev = 0;
  if (const cudaError_t err = cudaGetDevice(&dev); err != cudaSuccess) return err;
  std::atomic<size_t>& g = granted[dev & 63];
  if (bytes <= g.load(std::memory_order_relaxed)) return cudaSuccess;
  const cudaError_t err =
      cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err == cudaSuccess) g.store(bytes, std::memory_order_relaxed);
  return err;
}

// Launches kernel<<<grid, block, smem, stream>>>(args...), with programmatic dependent launch when
// `pdl` (sm_90+): the kernel may then start while the one ahead of it in the stream finishes, and
// must call grid_dependency_wait() (csrc/core/compat.h) before reading what that kernel writes.
// Captured into CUDA graphs as a programmatic edge.
// `cooperative`: every block resident at once (grid_sync, csrc/core/compat.h, allowed), or
// cudaErrorCooperativeLaunchTooLarge; also captured into graphs.
template <typename... Params, typename... Args>
cudaError_t launch_kernel_ex(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                             bool pdl, bool cooperative, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[2];
  unsigned n = 0;
  if (pdl) {
    attribute[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cooperative) {
    attribute[n].id = cudaLaunchAttributeCooperative;
    attribute[n++].val.cooperative = 1;
  }
  config.attrs = attribute;
  config.numAttrs = n;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool pdl,
                          Args&&... args) {
  return launch_kernel_ex(kernel, grid, block, smem, stream, pdl, false, std::forward<Args>(args)...);
}

}  // namespace moe_ext::cuda
