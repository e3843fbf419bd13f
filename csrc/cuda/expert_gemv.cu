// Launchers of the decode expert GEMVs: the tile-config tables and the vector / scalar choice.
#include <climits>

#include "../kernels/expert_gemv.cuh"
#include "dispatch.cuh"
#include "expert_gemv.h"

namespace moe_ext::cuda {
namespace {

using gemv::CombineConfig;
using gemv::SiluConfig;

// Tile configs (output columns per warp, experts per pass, 16-byte vectors per row in flight),
// timed by bench/tune_expert_gemv.py (results/h100-80gb-hbm3-tune-expert-gemv.md). Every config gives
// the same bits: a lane sums the same elements in the same order whatever the tile.
using SiluCfg0 = SiluConfig<2, 4>;
using SiluCfg1 = SiluConfig<1, 4>;
using SiluCfg2 = SiluConfig<4, 2>;
using SiluCfg3 = SiluConfig<2, 2>;
constexpr int kNumSiluConfigs = 4;

using CombineCfg0 = CombineConfig<1, 4, 2>;
using CombineCfg1 = CombineConfig<2, 2, 2>;
using CombineCfg2 = CombineConfig<1, 8, 1>;
using CombineCfg3 = CombineConfig<2, 4, 1>;
using CombineCfg4 = CombineConfig<1, 2, 4>;
using CombineCfg5 = CombineConfig<1, 2, 2>;
// Two warps a column, each one of the token's experts a pass with four vectors a row in flight
// (moe_gemv_combine_kernel's split): twice config 5's warps. Session 14, H200, the layer at T = 1
// (bench/NOTES.md): Mixtral (topk 2, 14336-element rows) 179.2 -> 169.2 us; GPT-OSS (topk 4) 56.0 ->
// 57.3, Qwen3 (topk 8) 26.2 -> 27.1. Splits of configs 2 (<1, 4, 1, 2>) and 5 (<1, 2, 2, 2>) were slower
// or equal everywhere (GPT-OSS T=1 84.6 and 59.8 us) and are not kept.
using CombineCfg6 = CombineConfig<1, 1, 4, 2>;
// Config 2 held to 128 registers, four CTAs a multiprocessor (135 registers gave three): Qwen3's grid
// at one token (512 CTAs) then runs in one wave. Session 27, H200, the layer at T=1: 25.2 -> 24.1 us.
using CombineCfg7 = CombineConfig<1, 8, 1, 1, 4>;
constexpr int kNumCombineConfigs = 8;

// Defaults from the H100 tuning at T = 1..8 of the four model shapes, checked on an H200 at T = 1, 4
// (session 8: results/h200-tune-expert-gemv-prefetch2.md, where config 5 below ran as config 8), then
// re-decided on the H200 by the layer itself (session 27: results/h200-s27-*.md, graph replay, each
// config forced in turn; bench/NOTES.md).
// SiLU: config 3 fastest or within 1% everywhere on both (H100 GPT-OSS T=1: 47 us, config 0 57).
// Combine: on the H200 config 5 (two experts a pass, two vectors in flight: half config 4's loads in
// registers, so more CTAs a multiprocessor) beat config 4, the H100's pick, by 4-22% (DeepSeek-V3
// T=1 56.5 against 72.8 us, GPT-OSS T=1 20.4 against 24.7, Mixtral T=4 218 against 261: 74-101% of
// read bandwidth). Rows under 32 lanes x 4 vectors leave lanes idle: there, at topk >= 8, eight experts
// a pass with one vector each (config 7, config 2 within four CTAs a multiprocessor) for one token and
// two columns a warp over four experts (config 3) for more (Qwen3, K = 768, layer: T=1 24.1 us against
// config 2's 25.2; T = 2 / 4 40.6 / 65.3 against config 5's 44.6 / 69.3). One token over long rows: two
// columns over two experts (config 1) at topk >= 8 (DeepSeek-V3 T=1: 167.6 against 172.6), the split
// (config 6) at topk <= 2.
constexpr int kDefaultSiluConfig = 3;
constexpr int kShortRowVectors = kWarpSize * 4;  // "rows under 32 lanes x 4 vectors" above
constexpr int kManySlots = CombineCfg2::kSlots;   // "topk >= 8" above
int default_combine_config(int64_t M, int64_t K, int64_t topk, int elem_bytes) {
  const int64_t vectors = K * elem_bytes / kVecBytes;
  if (vectors < kShortRowVectors && topk >= kManySlots) return M == 1 ? 7 : 3;
  if (M == 1 && topk >= kManySlots) return 1;
  if (M == 1 && vectors >= kShortRowVectors && topk <= 2) return 6;  // one token, two long rows a column
  return 5;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0; }

template <typename Cfg>
cudaError_t launch(void (*kernel)(gemv::Params), const gemv::Params& p, int64_t ctas, bool pdl, cudaStream_t stream) {
  const int64_t tiles = (p.N + Cfg::kCols - 1) / Cfg::kCols;
  if (ctas > INT_MAX || tiles > 65535) return cudaErrorInvalidValue;
  return launch_kernel(kernel, dim3(static_cast<unsigned>(ctas), static_cast<unsigned>(tiles)), dim3(gemv::kThreads),
                       0, stream, pdl, p);
}

template <typename T, typename Cfg>
cudaError_t launch_silu(const gemv::Params& p, int64_t ctas, bool vec, bool pdl, cudaStream_t stream) {
  return vec ? launch<Cfg>(gemv::moe_gemv_silu_kernel<T, Cfg, true>, p, ctas, pdl, stream)
             : launch<Cfg>(gemv::moe_gemv_silu_kernel<T, Cfg, false>, p, ctas, pdl, stream);
}

template <typename T, typename Cfg>
cudaError_t launch_combine(const gemv::Params& p, int64_t ctas, bool vec, bool pdl, cudaStream_t stream) {
  if constexpr (Cfg::kSplit > 1) {  // the split's shared hand-off holds kMaxSplitTopk slots
    if (p.topk > gemv::kMaxSplitTopk)
      return launch_combine<T, CombineConfig<Cfg::kRows, Cfg::kSlots, Cfg::kU>>(p, ctas, vec, pdl, stream);
  }
  return vec ? launch<Cfg>(gemv::moe_gemv_combine_kernel<T, Cfg, true>, p, ctas, pdl, stream)
             : launch<Cfg>(gemv::moe_gemv_combine_kernel<T, Cfg, false>, p, ctas, pdl, stream);
}

bool vectorized(DType dtype, const void* x, const void* w, int64_t K) {
  const int64_t width = kVecBytes / (dtype == DType::kFloat32 ? 4 : 2);
  return K % width == 0 && aligned16(x) && aligned16(w);
}

}  // namespace

int moe_gemv_silu_num_configs() { return kNumSiluConfigs; }
int moe_gemv_combine_num_configs() { return kNumCombineConfigs; }

cudaError_t moe_gemv_silu(DType dtype, const void* a, const void* w13, const int32_t* topk_ids,
                          const int32_t* expert_map, void* out, int64_t M, int64_t topk, int64_t I, int64_t K,
                          int64_t E, int64_t E_route, int config, bool pdl, cudaStream_t stream) {
  const int64_t slots = M * topk;
  if (slots == 0 || I == 0) return cudaSuccess;
  if (config >= kNumSiluConfigs || 2 * I > INT_MAX || K > INT_MAX || E > INT_MAX || E_route > INT_MAX)
    return cudaErrorInvalidValue;
  const gemv::Params p{a, w13, topk_ids, nullptr, expert_map, out, static_cast<int>(topk), static_cast<int>(I),
                       static_cast<int>(K), static_cast<int>(E), static_cast<int>(E_route), false};
  const bool vec = vectorized(dtype, a, w13, K);
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    return dispatch_config<SiluCfg0, SiluCfg1, SiluCfg2, SiluCfg3>(
        config < 0 ? kDefaultSiluConfig : config,
        [&](auto c) { return launch_silu<T, decltype(c)>(p, slots, vec, pdl, stream); });
  });
}

cudaError_t moe_gemv_combine(DType dtype, const void* h, const void* w2, const int32_t* topk_ids,
                             const float* topk_weights, const int32_t* expert_map, void* out, int64_t M,
                             int64_t topk, int64_t H, int64_t K, int64_t E, int64_t E_route, int config,
                             bool pdl, bool prefetch, cudaStream_t stream) {
  if (M == 0 || H == 0) return cudaSuccess;
  if (config >= kNumCombineConfigs || H > INT_MAX || K > INT_MAX || E > INT_MAX || E_route > INT_MAX ||
      M * topk > INT_MAX)
    return cudaErrorInvalidValue;
  const gemv::Params p{h, w2, topk_ids, topk_weights, expert_map, out, static_cast<int>(topk), static_cast<int>(H),
                       static_cast<int>(K), static_cast<int>(E), static_cast<int>(E_route), pdl && prefetch};
  const bool vec = vectorized(dtype, h, w2, K);
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    return dispatch_config<CombineCfg0, CombineCfg1, CombineCfg2, CombineCfg3, CombineCfg4, CombineCfg5, CombineCfg6,
                           CombineCfg7>(
        config < 0 ? default_combine_config(M, K, topk, sizeof(T)) : config,
        [&](auto c) { return launch_combine<T, decltype(c)>(p, M, vec, pdl, stream); });
  });
}

}  // namespace moe_ext::cuda
