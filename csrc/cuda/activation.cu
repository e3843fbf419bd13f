// Launchers for SiLU-and-mul and the top-k combine (kernels in csrc/kernels/activation.cuh).
#include <algorithm>

#include "../core/static_switch.h"
#include "../kernels/activation.cuh"
#include "dispatch.cuh"
#include "launchers.h"

namespace moe_ext::cuda {
namespace {

// Threads per block: a row's vectors split evenly over ceil(per_row / max_threads) passes, in whole
// warps (360 vectors at most 256: 2 passes of 180 -> 192 threads, not 256 with a half-empty second
// pass); blocks: one per row, at most 16 per multiprocessor (blocks stride over the remaining rows).
int block_threads(int64_t per_row, int64_t max_threads) {
  const int64_t passes = std::max<int64_t>(1, (per_row + max_threads - 1) / max_threads);
  const int64_t threads = (per_row + passes - 1) / passes;
  return static_cast<int>(std::min<int64_t>(max_threads, std::max<int64_t>(32, (threads + 31) / 32 * 32)));
}
// The largest SiLU block (40 registers a thread). H200, session 14 (bench/NOTES.md silu_and_mul): 512
// against 256, GPT-OSS (360 vectors: one pass of 384 threads, not two of 192) 1.8% faster at T = 1024
// and 4096 and 5.0% at 16384, Mixtral (1792: four passes of 448, not seven of 256) 2.3-3.1%; rows of
// at most 256 vectors unchanged. The combine keeps 256: its 64-92 registers left one 384-thread block
// a multiprocessor at GPT-OSS (T=1024 +77%).
constexpr int64_t kSiluMaxThreads = 512;
constexpr int64_t kCombineMaxThreads = 256;
int grid_size(int64_t rows, int num_sms) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, int64_t(num_sms) * 16)));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0; }

// (row, vector) steps a SiLU thread loads before their math. H200 (bench/NOTES.md silu_and_mul v4), 1, 2
// or 4 at the four models' T = 1024 and 4096: 2 is best or within 1.1 points of the best at six of the
// eight, 1.5-1.8 behind 4 at Mixtral's two; 4 loses 4.7 at Qwen3 T=4096 and 1 up to 7.7.
constexpr int kSiluItems = 2;

}  // namespace

cudaError_t silu_and_mul(DType dtype, const void* x, void* out, int64_t rows, int64_t d, int num_sms, bool pdl,
                         cudaStream_t stream) {
  if (rows == 0 || d == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = d % Vec<T>::kSize == 0 && aligned16(x) && aligned16(out);
    return BOOL_SWITCH(vec, kVec, [&] {
      const int64_t per_row = d / (kVec ? Vec<T>::kSize : 1);
      const dim3 grid(grid_size(rows, num_sms)), block(block_threads(per_row, kSiluMaxThreads));
      return launch_kernel(silu_and_mul_kernel<T, kVec, kSiluItems>, grid, block, 0, stream, pdl,
                           static_cast<const T*>(x), static_cast<T*>(out), rows, d);
    });
  });
}

cudaError_t moe_combine(DType dtype, const void* x, const float* weights, void* out, int64_t num_tokens,
                        int topk, int64_t h, int num_sms, bool pdl, cudaStream_t stream) {
  if (num_tokens == 0 || h == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = h % Vec<T>::kSize == 0 && aligned16(x) && aligned16(out);
    return BOOL_SWITCH(vec, kVec, [&] {
      const int64_t per_row = h / (kVec ? Vec<T>::kSize : 1);
      const dim3 grid(grid_size(num_tokens, num_sms)), block(block_threads(per_row, kCombineMaxThreads));
      const auto run = [&](auto kernel) {
        return launch_kernel(kernel, grid, block, 0, stream, pdl, static_cast<const T*>(x), weights,
                             static_cast<T*>(out), num_tokens, topk, h);
      };
      // topk's rows in chunks of up to 8 a thread; for topk <= 4 (<= 2), two tokens' chunks of 4 (2).
      // H200 (bench/NOTES.md moe_combine v4): one token's 4 rows at a time lost 8.7 points at GPT-OSS
      // T=1024; four tokens' 2 rows 18 at Mixtral T=1024; chunks of 4 for topk 8 lost 3.6-7.7 points
      // except at Qwen3 T=1024 (2.0 ahead). Above topk 4, loads and stores evict-first (session 14):
      // Qwen3 T=1024 10.68 -> 9.87 us, T=4096 -2%, T=16384 +2%; at topk 4 it cost GPT-OSS T=1024 1.3%.
      if (topk <= 2) return run(moe_combine_kernel<T, kVec, 2, 2>);
      if (topk <= 4) return run(moe_combine_kernel<T, kVec, 4, 2>);
      return run(moe_combine_kernel<T, kVec, 8, 1, true>);
    });
  });
}

}  // namespace moe_ext::cuda
