// A/B harness for the router kernel (topk_gating_kernel): time per launch in a CUDA graph of 100
// launches, median of 35 replays, for whichever csrc/kernels is on the include path. Torch-free, so
// two variants build in seconds and run in one device call; the ids hash and weight sum show that
// the variants agree. Used for topk_gating v7 (bench/NOTES.md).
//
//   git show <rev>:csrc/kernels/gating.cuh > old/gating.cuh   (plus the headers it includes)
//   nvcc -std=c++17 -O3 -arch=sm_90a --expt-relaxed-constexpr --fmad=false -Icsrc/kernels \
//        -DVARIANT='"new"' bench/gate_ab.cu -o gate_new
//   nvcc ... -Iold -DVARIANT='"old"' bench/gate_ab.cu -o gate_old;  ./gate_new; ./gate_old
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "gating.cuh"
using namespace moe_ext;

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s at %d\n", cudaGetErrorString(e), __LINE__); exit(1);} } while (0)

template <int kPerLane>
void run(const char* name, int E, int k, int T, bool grouped) {
  std::vector<__nv_bfloat16> h(size_t(T) * E);
  srand(1234);
  for (auto& v : h) v = __float2bfloat16((rand() / float(RAND_MAX) - 0.5f) * 6.0f);
  std::vector<float> hb(E);
  for (auto& v : hb) v = (rand() / float(RAND_MAX) - 0.5f) * 0.2f;
  __nv_bfloat16* logits; float *w, *bias; int32_t* ids;
  CK(cudaMalloc(&logits, h.size() * 2)); CK(cudaMalloc(&w, T * k * 4)); CK(cudaMalloc(&ids, T * k * 4)); CK(cudaMalloc(&bias, E * 4));
  CK(cudaMemcpy(logits, h.data(), h.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(bias, hb.data(), E * 4, cudaMemcpyHostToDevice));
  GatingParams p{E, k, grouped ? ScoringFunc::kSigmoid : ScoringFunc::kSoftmax, true, grouped ? bias : nullptr,
                 grouped ? 8 : 1, grouped ? 4 : 1, grouped ? 2.5f : 1.0f};
  const int blocks = (T + kGateGroupsPerBlock - 1) / kGateGroupsPerBlock;
  const int smem = grouped ? kGateGroupsPerBlock * grouped_smem_bytes(E, 8) : 0;
  cudaStream_t s; CK(cudaStreamCreate(&s));
  const int kLaunches = 100;
  cudaGraph_t g; cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  // The instance the extension launches: one a gating path (gate_path, session 22 on).
  const GatePath path = gate_path(p);
  using bf16 = __nv_bfloat16;
  const auto kernel = path == GatePath::kLogitRenorm ? topk_gating_kernel<bf16, kPerLane, GatePath::kLogitRenorm>
                      : path == GatePath::kLogit     ? topk_gating_kernel<bf16, kPerLane, GatePath::kLogit>
                                                     : topk_gating_kernel<bf16, kPerLane, GatePath::kScore>;
  for (int i = 0; i < kLaunches; ++i)
    kernel<<<blocks, kGateGroupsPerBlock * kGateLanes, smem, s>>>(logits, E, T, p, w, ids);
  CK(cudaStreamEndCapture(s, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  cudaEvent_t a, b; CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
  std::vector<float> ts;
  for (int r = 0; r < 40; ++r) {
    CK(cudaEventRecord(a, s)); CK(cudaGraphLaunch(ge, s)); CK(cudaEventRecord(b, s)); CK(cudaEventSynchronize(b));
    float ms; CK(cudaEventElapsedTime(&ms, a, b)); if (r >= 5) ts.push_back(ms * 1000.0f / kLaunches);
  }
  std::sort(ts.begin(), ts.end());
  std::vector<int> hid(T * k); std::vector<float> hw(T * k);
  CK(cudaMemcpy(hid.data(), ids, T * k * 4, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(hw.data(), w, T * k * 4, cudaMemcpyDeviceToHost));
  long sum = 0; double wsum = 0; for (int i = 0; i < T * k; ++i) { sum = sum * 31 + hid[i]; wsum += hw[i] * (i + 1); }
  printf("%-10s E=%4d k=%d T=%3d | %.3f us/launch (min %.3f) | ids hash %ld wsum %.6f\n", name, E, k, T, ts[ts.size() / 2], ts[0], sum, wsum);
  cudaFree(logits); cudaFree(w); cudaFree(ids); cudaFree(bias);
}

int main() {
  const char* name = VARIANT;
  for (int rep = 0; rep < 2; ++rep) {
    run<8>(name, 256, 8, 1, false);
    run<8>(name, 256, 8, 16, false);
    run<4>(name, 128, 4, 1, false);
    run<4>(name, 128, 8, 1, false);
    run<8>(name, 256, 8, 1, true);
    run<1>(name, 8, 2, 1, false);
  }
  return 0;
}
