// A/B harness for SiLU-and-mul and the top-k combine (csrc/kernels/activation.cuh), bf16, the
// vectorized path: the four models' shapes at the token counts given, each kernel launched as the
// extension launches it (same block and grid rule as csrc/cuda/activation.cu, programmatic dependent
// launch on), timed per launch in a CUDA graph of 20 launches over rotating inputs (more bytes than L2
// holds), median of 35 replays (bench/ab_common.cuh), and reported against a 2 GiB device copy.
// Torch-free, so variants of the kernel header build in seconds and run in one device call
// (bench/elementwise_ab.py). Headers before session 13's RowWalk kernels take the old template
// parameters (-DEW_OLD).
//
//   nvcc -std=c++17 -O3 -arch=sm_90a --expt-relaxed-constexpr -I<variant>/kernels [-DEW_OLD] \
//        -DVARIANT='"name"' bench/elementwise_ab.cu -o elementwise_ab_name && ./elementwise_ab_name 1024 16384
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "ab_common.cuh"
#include "activation.cuh"
#include "../csrc/cuda/activation_shape.h"
#include "../csrc/cuda/dispatch.cuh"
using namespace moe_ext;
using moe_ext::cuda::elementwise_block_threads;
using moe_ext::cuda::elementwise_grid_size;
using bf16 = __nv_bfloat16;

#ifndef EW_SILU_ITEMS
#define EW_SILU_ITEMS 2  // csrc/cuda/activation.cu's kSiluItems
#endif

// The extension's launcher (programmatic dependent launch on).
template <typename K, typename... A>
void launch(K kernel, dim3 grid, dim3 block, cudaStream_t s, A... args) {
  CK(moe_ext::cuda::launch_kernel(kernel, grid, block, 0, s, true, args...));
}

void launch_silu(const bf16* x, bf16* out, int64_t rows, int64_t d, int sms, cudaStream_t s) {
  const dim3 grid(elementwise_grid_size(rows, sms)), block(elementwise_block_threads(d / 8));
#ifdef EW_OLD
  launch(silu_and_mul_kernel<bf16, true>, grid, block, s, x, out, rows, d);
#else
  launch(silu_and_mul_kernel<bf16, true, EW_SILU_ITEMS>, grid, block, s, x, out, rows, d);
#endif
}

void launch_combine(const bf16* x, bf16* out, int64_t tokens, int topk, int64_t h, int sms, cudaStream_t s) {
  const dim3 grid(elementwise_grid_size(tokens, sms)), block(elementwise_block_threads(h / 8));
  const float* w = nullptr;
#ifdef EW_OLD
  launch(moe_combine_kernel<bf16, true>, grid, block, s, x, w, out, tokens, topk, h);
#else
  if (topk <= 2) {
    launch(moe_combine_kernel<bf16, true, 2, 2>, grid, block, s, x, w, out, tokens, topk, h);
  } else if (topk <= 4) {
    launch(moe_combine_kernel<bf16, true, 4, 2>, grid, block, s, x, w, out, tokens, topk, h);
  } else {
    launch(moe_combine_kernel<bf16, true, 8, 1>, grid, block, s, x, w, out, tokens, topk, h);
  }
#endif
}

// Rotating inputs: enough copies of `bytes` to exceed 256 MB (at most 16), filled with bf16 ones.
std::vector<bf16*> inputs(size_t bytes) {
  const size_t n = std::min<size_t>(16, std::max<size_t>(1, (size_t(256) << 20) / bytes + 1));
  std::vector<bf16*> v(n);
  for (auto& p : v) {
    CK(cudaMalloc(&p, bytes));
    CK(cudaMemset(p, 0x3f, bytes));  // 0x3f3f: a finite bf16 (~0.75)
  }
  return v;
}

int main(int argc, char** argv) {
  std::vector<int> tokens;
  for (int i = 1; i < argc; ++i) tokens.push_back(atoi(argv[i]));
  if (tokens.empty()) tokens = {1024, 4096, 16384};
  cudaStream_t s;
  CK(cudaStreamCreate(&s));
  int sms;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const size_t cbytes = size_t(2) << 30;
  void *ca, *cb;
  CK(cudaMalloc(&ca, cbytes));
  CK(cudaMalloc(&cb, cbytes));
  const float copy_us =
      time_graph(s, 20, [&](int) { CK(cudaMemcpyAsync(cb, ca, cbytes, cudaMemcpyDeviceToDevice, s)); });
  const double bw = 2.0 * cbytes / (copy_us * 1e-6) / 1e9;
  CK(cudaFree(ca));
  CK(cudaFree(cb));
  printf("%-10s copy bandwidth %.0f GB/s\n", VARIANT, bw);
  struct Model {
    const char* name;
    int topk, hidden, inter;
  };
  const Model models[] = {{"deepseek-v3", 8, 7168, 2048}, {"gpt-oss-120b", 4, 2880, 2880},
                          {"mixtral-8x7b", 2, 4096, 14336}, {"qwen3-30b-a3b", 8, 2048, 768}};
  for (const Model& m : models) {
    for (int T : tokens) {
      {  // silu_and_mul: [T * k, 2I] -> [T * k, I]
        const int64_t rows = int64_t(T) * m.topk, d = m.inter;
        auto in = inputs(size_t(rows) * 2 * d * 2);
        bf16* out;
        CK(cudaMalloc(&out, size_t(rows) * d * 2));
        const float us = time_graph(s, 20, [&](int i) { launch_silu(in[i % in.size()], out, rows, d, sms, s); });
        const double bytes = 3.0 * rows * d * 2;
        printf("%-10s silu_and_mul %-14s T=%6d %9.2f us %6.1f%% of copy\n", VARIANT, m.name, T, us,
               100.0 * bytes / (bw * 1e9) / (us * 1e-6));
        for (auto p : in) CK(cudaFree(p));
        CK(cudaFree(out));
      }
      {  // moe_combine: [T, k, H] -> [T, H]
        const int64_t h = m.hidden;
        auto in = inputs(size_t(T) * m.topk * h * 2);
        bf16* out;
        CK(cudaMalloc(&out, size_t(T) * h * 2));
        const float us =
            time_graph(s, 20, [&](int i) { launch_combine(in[i % in.size()], out, T, m.topk, h, sms, s); });
        const double bytes = double(m.topk + 1) * T * h * 2;
        printf("%-10s moe_combine  %-14s T=%6d %9.2f us %6.1f%% of copy\n", VARIANT, m.name, T, us,
               100.0 * bytes / (bw * 1e9) / (us * 1e-6));
        for (auto p : in) CK(cudaFree(p));
        CK(cudaFree(out));
      }
    }
  }
  return 0;
}
