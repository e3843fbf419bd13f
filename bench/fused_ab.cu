// A/B harness for the decode routing kernels: the fused gating + alignment kernel
// (fused_gating_align_kernel), the router (topk_gating_kernel), the one-block alignment
// (moe_align_small_kernel) and an empty kernel, each timed per launch in a CUDA graph of 100 launches
// with programmatic dependent launch (as the extension launches them), median of 35 replays
// (bench/ab_common.cuh). Torch-free, so variants of csrc/kernels (an ablation, a candidate) build in
// seconds and run in one device call; the output hash shows whether two variants agree.
// bench/fused_ab.py builds the variants; used for fused_topk_align v6 (bench/NOTES.md).
//
//   nvcc -std=c++17 -O3 -arch=sm_90a --expt-relaxed-constexpr --fmad=false -I<variant>/kernels \
//        -DVARIANT='"name"' [-DFUSED_AB_PACKED] bench/fused_ab.cu -o fused_ab_name
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "ab_common.cuh"
#include "align.cuh"
#include "fused_routing.cuh"
#include "gating.cuh"
#include "../csrc/cuda/dispatch.cuh"
using namespace moe_ext;

#ifndef FUSED_AB_ROUTER_LOOKAHEAD
#define FUSED_AB_ROUTER_LOOKAHEAD true
#endif

__global__ void empty_kernel() {
  grid_dependents_launch();
  grid_dependency_wait();
}

// The extension's launcher (programmatic dependent launch on), whichever kernels are on the path.
template <typename... P, typename... A>
void launch(void (*k)(P...), int blocks, int threads, size_t smem, cudaStream_t s, A... args) {
  CK(moe_ext::cuda::launch_kernel(k, dim3(blocks), dim3(threads), smem, s, true, args...));
}

template <typename T>
T* upload(const std::vector<T>& h) {
  T* d;
  CK(cudaMalloc(&d, h.size() * sizeof(T)));
  CK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}
template <typename T>
std::vector<T> download(const T* d, size_t n) {
  std::vector<T> h(n);
  CK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

// The routing of each case: softmax top-k renormalized (DeepSeek-R1's E=256 top-8 shape, GPT-OSS), DeepSeek-V3's
// grouped sigmoid with a correction bias, and softmax without renormalizing (Qwen1.5/Qwen2-MoE: every numerator
// summed).
enum class Mode { kSoftmax, kGrouped, kNoRenorm };

// Headers from session 22 on take the gating's path as a template argument: -DFUSED_AB_GATE_ENUM (GatePath: the
// score path, the logit path, the logit path renormalized) or, in a679dbf, -DFUSED_AB_GATE_PATH (bool: the logit
// path for softmax without bias or groups, every mode here but kGrouped).
#if defined(FUSED_AB_GATE_ENUM)
#define GATE_PATH(mode)                                           \
  (mode == Mode::kGrouped    ? GatePath::kScore                   \
   : mode == Mode::kNoRenorm ? GatePath::kLogit                   \
                             : GatePath::kLogitRenorm),
#elif defined(FUSED_AB_GATE_PATH)
#define GATE_PATH(mode) (mode != Mode::kGrouped),
#else
#define GATE_PATH(mode)
#endif

template <int kPerLane, Mode kMode>
void run(const char* variant, int E, int k, int T, cudaStream_t s) {
  constexpr Mode mode = kMode;
  const bool grouped = mode == Mode::kGrouped;
  const int bs = 16;
  std::vector<__nv_bfloat16> hl(size_t(T) * E);
  srand(1234 + T);
  for (auto& v : hl) v = __float2bfloat16((rand() / float(RAND_MAX) - 0.5f) * 6.0f);
  std::vector<float> hb(E);
  for (auto& v : hb) v = (rand() / float(RAND_MAX) - 0.5f) * 0.2f;
  __nv_bfloat16* logits = upload(hl);
  float* bias = upload(hb);
  const int numel = T * k, max_padded = static_cast<int>(align_max_padded(numel, E, bs)), nblocks = max_padded / bs;
  float* w;
  int32_t *ids, *sorted, *eids, *npp;
  CK(cudaMalloc(&w, numel * 4));
  CK(cudaMalloc(&ids, numel * 4));
  CK(cudaMalloc(&sorted, max_padded * 4));
  CK(cudaMalloc(&eids, nblocks * 4));
  CK(cudaMalloc(&npp, 4));
  GatingParams p{E,
                 k,
                 grouped ? ScoringFunc::kSigmoid : ScoringFunc::kSoftmax,
                 mode != Mode::kNoRenorm,
                 grouped ? bias : nullptr,
                 grouped ? 8 : 1, grouped ? 4 : 1, grouped ? 2.5f : 1.0f};
  const int G = p.num_expert_group;
  const int fsmem = fused_smem_bytes(E, G, T);
#if defined(FUSED_AB_ROUNDS_RULE)  // the instance the extension launches (csrc/cuda/routing.cu fused_launch)
  const auto fused_kernel = [&] {
    switch (fused_rounds(T, k, G)) {
      case FusedRounds::kPacked:
        return fused_gating_align_kernel<__nv_bfloat16, kPerLane, GATE_PATH(kMode) FusedRounds::kPacked>;
      case FusedRounds::kLookahead:
        return fused_gating_align_kernel<__nv_bfloat16, kPerLane, GATE_PATH(kMode) FusedRounds::kLookahead>;
      default:
        return fused_gating_align_kernel<__nv_bfloat16, kPerLane, GATE_PATH(kMode) FusedRounds::kExact>;
    }
  }();
#elif defined(FUSED_AB_PACKED_RULE)  // sessions 20-21: fused_packed_rounds picks the packed instance
  const auto fused_kernel = fused_packed_rounds(T, k, G)
                                ? fused_gating_align_kernel<__nv_bfloat16, kPerLane, true>
                                : fused_gating_align_kernel<__nv_bfloat16, kPerLane, false>;
#elif defined(FUSED_AB_PACKED)  // session 13 to 19: packed up to kFusedPackedMaxTokens
  const auto fused_kernel = T <= kFusedPackedMaxTokens && G <= 1
                                ? fused_gating_align_kernel<__nv_bfloat16, kPerLane, true>
                                : fused_gating_align_kernel<__nv_bfloat16, kPerLane, false>;
#else  // headers before the packed rounds (session 13); -DFUSED_AB_PACKED for later ones
  const auto fused_kernel = fused_gating_align_kernel<__nv_bfloat16, kPerLane>;
#endif
  const float fused = time_graph(s, 100, [&](int) {
    launch(fused_kernel, 1, fused_threads(E, T), fsmem, s,
           (const __nv_bfloat16*)logits, int64_t(E), T, p, bs, 4, (const int32_t*)nullptr, max_padded, w, ids, sorted,
           eids, npp);
  });
  CK(cudaMemset(sorted, 0x7f, max_padded * 4));  // poison: a fill the kernel skips shows in the hash
  CK(cudaMemset(eids, 0x7f, nblocks * 4));
  launch(fused_kernel, 1, fused_threads(E, T), fsmem, s,
         (const __nv_bfloat16*)logits, int64_t(E), T, p, bs, 4, (const int32_t*)nullptr, max_padded, w, ids, sorted,
         eids, npp);
  CK(cudaStreamSynchronize(s));
  long h = 0;
  for (int v : download(ids, numel)) h = h * 31 + v;
  for (int v : download(sorted, max_padded)) h = h * 31 + v;
  for (int v : download(eids, nblocks)) h = h * 31 + v;
  h = h * 31 + download(npp, 1)[0];
  double ws = 0;
  const auto hw = download(w, numel);
  for (int i = 0; i < numel; ++i) ws += hw[i] * (i + 1);
  const int gblocks = (T + kGateGroupsPerBlock - 1) / kGateGroupsPerBlock;
  const int gsmem = grouped ? kGateGroupsPerBlock * grouped_smem_bytes(E, G) : 0;
  // The instance the extension launches at these sizes (csrc/cuda/routing.cu: the lookahead rounds up
  // to kGateLookaheadMaxBlocks = 4 blocks, i.e. every T here); -DFUSED_AB_ROUTER_LOOKAHEAD=false times
  // the other one.
  const float router = time_graph(s, 100, [&](int) {
    launch(topk_gating_kernel<__nv_bfloat16, kPerLane, GATE_PATH(kMode) FUSED_AB_ROUTER_LOOKAHEAD>, gblocks,
           kGateGroupsPerBlock * kGateLanes, gsmem, s, (const __nv_bfloat16*)logits, int64_t(E), T, p, w, ids);
  });
  const int athreads = std::min(1024, std::max(128, (std::max(numel, E) + 31) / 32 * 32));
  const size_t asmem = size_t(align_small_smem_ints(E, numel)) * 4;
  const float align = time_graph(s, 100, [&](int) {
    launch(moe_align_small_kernel, 1, athreads, asmem, s, (const int32_t*)ids, numel, E, bs, (const int32_t*)nullptr,
           max_padded, sorted, eids, npp);
  });
  printf("%-12s E=%4d k=%d T=%2d %-8s | fused %.3f | router %.3f | align %.3f | hash %ld wsum %.6f\n", variant, E, k, T,
         grouped ? "grouped" : mode == Mode::kNoRenorm ? "norenorm" : "softmax", fused, router, align, h, ws);
  cudaFree(logits); cudaFree(bias); cudaFree(w); cudaFree(ids); cudaFree(sorted); cudaFree(eids); cudaFree(npp);
}

int main() {
  cudaStream_t s;
  CK(cudaStreamCreate(&s));
  for (int rep = 0; rep < 2; ++rep) {
    const float empty = time_graph(s, 100, [&](int) { launch(empty_kernel, 1, 32, 0, s); });
    printf("%-12s empty kernel %.3f us\n", VARIANT, empty);
    for (int T : {1, 2, 4, 5, 6, 8, 12, 16}) run<8, Mode::kSoftmax>(VARIANT, 256, 8, T, s);
    for (int T : {1, 4, 8, 12, 16}) run<4, Mode::kSoftmax>(VARIANT, 128, 4, T, s);
    for (int T : {1, 4, 16}) run<8, Mode::kGrouped>(VARIANT, 256, 8, T, s);
    for (int T : {1, 4, 16}) run<2, Mode::kNoRenorm>(VARIANT, 60, 4, T, s);  // Qwen1.5-MoE-A2.7B
    for (int T : {1, 4, 16}) run<2, Mode::kNoRenorm>(VARIANT, 64, 8, T, s);  // Qwen2-57B-A14B
  }
  return 0;
}
