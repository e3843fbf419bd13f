// A/B harness for SiLU-and-mul and the top-k combine, bf16: the four models' shapes at the token
// counts given, each op called through the extension's own torch-free launcher
// (moe_ext::cuda::silu_and_mul / moe_combine, compiled from the variant's csrc/cuda/activation.cu, so
// launch shape and kernel choice are the variant's), timed per launch in a CUDA graph of 20 launches
// over rotating inputs (more bytes than L2 holds), median of 35 replays (bench/ab_common.cuh), with the
// bytes read plus written per second. (No copy-bandwidth line: a cudaMemcpyAsync node read 2.78 TB/s
// on the H200 against 4.28 for torch's copy kernel, so compare variants by time; bench_elementwise.py
// gives % of copy bandwidth.) Torch-free, so variants build in seconds and run in one device call
// (bench/elementwise_ab.py).
//
//   nvcc -std=c++17 -O3 -arch=sm_90a --expt-relaxed-constexpr -DVARIANT='"name"' \
//        bench/elementwise_ab.cu <variant>/cuda/activation.cu -o elementwise_ab_name && ./elementwise_ab_name 1024
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <cuda_bf16.h>

#include "ab_common.cuh"
#include "../csrc/cuda/launchers.h"

using bf16 = __nv_bfloat16;
using moe_ext::DType;

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
        const float us = time_graph(s, 20, [&](int i) {
          CK(moe_ext::cuda::silu_and_mul(DType::kBFloat16, in[i % in.size()], out, rows, d, sms, true, s));
        });
        const double bytes = 3.0 * rows * d * 2;
        printf("%-10s silu_and_mul %-14s T=%6d %9.2f us %6.0f GB/s\n", VARIANT, m.name, T, us, bytes / (us * 1e3));
        for (auto p : in) CK(cudaFree(p));
        CK(cudaFree(out));
      }
      {  // moe_combine: [T, k, H] -> [T, H]
        const int64_t h = m.hidden;
        auto in = inputs(size_t(T) * m.topk * h * 2);
        bf16* out;
        CK(cudaMalloc(&out, size_t(T) * h * 2));
        const float us = time_graph(s, 20, [&](int i) {
          CK(moe_ext::cuda::moe_combine(DType::kBFloat16, in[i % in.size()], nullptr, out, T, m.topk, h, sms, true, s));
        });
        const double bytes = double(m.topk + 1) * T * h * 2;
        printf("%-10s moe_combine  %-14s T=%6d %9.2f us %6.0f GB/s\n", VARIANT, m.name, T, us, bytes / (us * 1e3));
        for (auto p : in) CK(cudaFree(p));
        CK(cudaFree(out));
      }
    }
  }
  return 0;
}
