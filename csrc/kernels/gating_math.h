// Scalar math of router gating, shared bit-for-bit by the CPU kernel and the CUDA kernels.
//
// Integer outputs (topk_ids) must be identical on every backend, so every float operation that
// decides a comparison is spelled out here with a fixed rounding sequence: exp is our own
// Cody-Waite reduction plus a degree-7 polynomial evaluated with explicit fmaf (no libm, no
// compiler contraction can change it), divisions are IEEE, and the softmax denominator is summed
// in a fixed tree order (kReduceLanes strided partial sums, then a butterfly), which is exactly
// what one warp per token computes on the GPU; each numerator is then multiplied by the
// denominator's reciprocal (one division per token).
//
// NaN/Inf policy: a NaN logit counts as -inf and +inf counts as FLT_MAX, so a row that holds +inf
// puts all its softmax mass on its +inf entries; a row with no finite-or-+inf logit scores every
// expert equally. Selection keys (score + correction bias) are NaN-free and at most FLT_MAX, so a
// group score (sum of two keys) is never NaN either. Softmax without bias or groups selects on the
// sanitized logits instead (routing_host.h softmax_by_logit), the order of the exact softmax.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstring>

#include "../core/compat.h"

namespace moe_ext {

// Partial sums in the softmax denominator: element i goes to partial i % kReduceLanes.
constexpr int kReduceLanes = 32;

// Largest E and topk the routing ops accept.
constexpr int kMaxExperts = 1024;
constexpr int kMaxTopK = 32;

enum class ScoringFunc : int { kSoftmax = 0, kSigmoid = 1 };

MOE_HOST_DEVICE MOE_FORCEINLINE float sanitize_logit(float x) {
  if (x != x) return -INFINITY;
  return x > FLT_MAX ? FLT_MAX : x;
}

// 2^n for n in [-126, 127], built from its bits (exact).
MOE_HOST_DEVICE MOE_FORCEINLINE float exp2_int(int n) {
  const int bits = (n + 127) << 23;
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return __int_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

// e^x with a fixed operation sequence. Returns exactly 0 below -86 (results there would be within
// a few binades of the denormals; flushing them keeps every path in normal range) and +inf above 88.
// Branch-free: the polynomial runs on a clamped argument and the ends are selected afterwards, so
// a warp evaluating many of these never diverges.
MOE_HOST_DEVICE MOE_FORCEINLINE float moe_expf(float x) {
  const float xc = fminf(fmaxf(x, -86.0f), 88.0f);
  const float n = rintf(xc * 1.44269504088896341f);
  float r = fmaf(n, -0.693359375f, xc);
  r = fmaf(n, 2.12194440e-4f, r);
  float p = 1.98412698e-4f;  // 1/5040
  p = fmaf(p, r, 1.38888889e-3f);
  p = fmaf(p, r, 8.33333333e-3f);
  p = fmaf(p, r, 4.16666667e-2f);
  p = fmaf(p, r, 1.66666667e-1f);
  p = fmaf(p, r, 0.5f);
  p = fmaf(p, r, 1.0f);
  p = fmaf(p, r, 1.0f);
  const float e = p * exp2_int(static_cast<int>(n));  // exact: p in [0.7, 1.5], result normal
  return !(x >= -86.0f) ? 0.0f : (x > 88.0f ? INFINITY : e);
}

MOE_HOST_DEVICE MOE_FORCEINLINE float moe_sigmoidf(float x) { return 1.0f / (1.0f + moe_expf(-x)); }

// Softmax numerator of a sanitized logit, given the sanitized row maximum: e^(x - max), or 1 for every
// expert of a row with no finite-or-+inf logit (max -inf), as e^0 (moe_expf(0) is exactly 1). A select of
// the argument rather than of the result, so a GPU warp computing several never branches around an e^x.
MOE_HOST_DEVICE MOE_FORCEINLINE float softmax_numerator(float x, float row_max) {
  return moe_expf(row_max == -INFINITY ? 0.0f : x - row_max);
}

// Selection key: score plus optional correction bias, clamped to [-inf, FLT_MAX], never NaN.
MOE_HOST_DEVICE MOE_FORCEINLINE float selection_key(float score, float bias) {
  const float k = score + bias;
  if (k != k) return -INFINITY;
  return k > FLT_MAX ? FLT_MAX : k;
}

// Strict total order used by every top-k: higher key first, then lower index.
MOE_HOST_DEVICE MOE_FORCEINLINE bool ranks_before(float key_a, int idx_a, float key_b, int idx_b) {
  return key_a > key_b || (key_a == key_b && idx_a < idx_b);
}

// Final weight of rank j: renormalized by the sum of the selected scores (summed in rank order) and
// scaled. A zero sum (every selected score 0) gives equal weights, the limit of equal scores.
MOE_HOST_DEVICE MOE_FORCEINLINE float finalize_weight(float w, float selected_sum, bool renormalize,
                                                      int topk, float scale) {
  if (renormalize) w = selected_sum > 0.0f ? w / selected_sum : 1.0f / static_cast<float>(topk);
  return w * scale;
}

}  // namespace moe_ext
