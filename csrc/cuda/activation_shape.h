// Launch shape of SiLU-and-mul and the top-k combine (csrc/cuda/activation.cu), host-only; also
// used by bench/elementwise_ab.cu so the harness launches the kernels as the extension does.
#pragma once

#include <algorithm>
#include <cstdint>

namespace moe_ext::cuda {

// Threads per block: a row's vectors split evenly over ceil(per_row / 256) passes, in whole warps
// (360 vectors: 2 passes of 180 -> 192 threads, not 256 threads with a half-empty second pass);
// blocks: one per row, at most 16 per multiprocessor (blocks stride over the remaining rows).
inline int elementwise_block_threads(int64_t per_row) {
  const int64_t passes = std::max<int64_t>(1, (per_row + 255) / 256);
  const int64_t threads = (per_row + passes - 1) / passes;
  return static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, (threads + 31) / 32 * 32)));
}
inline int elementwise_grid_size(int64_t rows, int num_sms) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, int64_t(num_sms) * 16)));
}

}  // namespace moe_ext::cuda
