// Host (CPU) routing kernels, torch-free: top-k gating of one token and expert alignment.
//
// gating_row: scores -> selection keys -> (grouped) top-k -> weights, using gating_math.h so the
// result is bit-identical to the CUDA kernels. Selection is a partial sort under the strict order
// ranks_before (key desc, index asc): O(E log topk) per token.
//
// align_max_padded / align_slot: the alignment layout's size and which ids it keeps, shared by the
// CPU alignment (csrc/cpu/routing_cpu.cpp: a three-pass counting sort over chunks, scanned in
// chunk order so each expert's run ascends whatever the thread count) and the CUDA adapters.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "gating_math.h"

namespace moe_ext {

struct GatingParams {
  int num_experts;          // E
  int topk;                 // 1..min(E, kMaxTopK)
  ScoringFunc scoring;      // softmax or sigmoid
  bool renormalize;
  const float* bias;        // [E] fp32 or nullptr
  int num_expert_group;     // G >= 1, divides E
  int topk_group;           // 1..G
  float routed_scaling_factor;
};

// Per-thread scratch for gating_row; sized once per thread, reused across tokens.
struct GatingScratch {
  std::vector<float> score, key, group_score;
  std::vector<int> order;
  std::vector<char> group_allowed;
  void resize(int E, int G) {
    score.resize(E);
    key.resize(E);
    order.resize(E);
    group_score.resize(G);
    group_allowed.resize(G);
  }
};

// Softmax without correction bias or expert groups ranks experts by their sanitized logits (softmax_by_logit).
MOE_HOST_DEVICE MOE_FORCEINLINE bool softmax_by_logit(const GatingParams& p) {
  return p.scoring == ScoringFunc::kSoftmax && p.bias == nullptr && p.num_expert_group <= 1;
}

// Softmax's denominator: the numerators summed into kReduceLanes strided partials (element i into
// partial i % kReduceLanes, in i order), then a butterfly in the order of an xor-shuffle reduction.
inline float softmax_denominator(const float* numerator, int E) {
  float lanes[kReduceLanes] = {};
  for (int i = 0; i < E; ++i) lanes[i % kReduceLanes] += numerator[i];
  for (int offset = kReduceLanes / 2; offset > 0; offset /= 2) {
    float next[kReduceLanes];
    for (int l = 0; l < kReduceLanes; ++l) next[l] = lanes[l] + lanes[l ^ offset];
    std::copy(next, next + kReduceLanes, lanes);
  }
  return lanes[0];
}

// logits: [E] fp32 (raw; sanitized here). Writes weights [topk] and ids [topk].
inline void gating_row(const float* logits, const GatingParams& p, GatingScratch& s,
                       float* weights, int32_t* ids) {
  const int E = p.num_experts;
  float* score = s.score.data();
  float* key = s.key.data();
  int* order = s.order.data();

  if (softmax_by_logit(p)) {
    // The top-k by logit is the top-k of the exact softmax; only the chosen experts' numerators are
    // needed when renormalizing (their sum is the denominator), every one otherwise.
    for (int i = 0; i < E; ++i) {
      key[i] = sanitize_logit(logits[i]);
      order[i] = i;
    }
    std::partial_sort(order, order + p.topk, order + E,
                      [key](int a, int b) { return ranks_before(key[a], a, key[b], b); });
    const float row_max = key[order[0]];
    float inv_denom = 1.0f;
    if (!p.renormalize) {
      for (int i = 0; i < E; ++i) score[i] = softmax_numerator(key[i], row_max);
      inv_denom = 1.0f / softmax_denominator(score, E);
    }
    float selected_sum = 0.0f;
    for (int j = 0; j < p.topk; ++j) {  // rank j's numerator, summed in rank order
      weights[j] = softmax_numerator(key[order[j]], row_max);
      selected_sum += weights[j];
    }
    for (int j = 0; j < p.topk; ++j) {
      ids[j] = order[j];
      const float w = p.renormalize ? weights[j] : weights[j] * inv_denom;
      weights[j] = finalize_weight(w, selected_sum, p.renormalize, p.topk, p.routed_scaling_factor);
    }
    return;
  }

  if (p.scoring == ScoringFunc::kSoftmax) {
    float row_max = -INFINITY;
    for (int i = 0; i < E; ++i) row_max = std::max(row_max, sanitize_logit(logits[i]));
    for (int i = 0; i < E; ++i) score[i] = softmax_numerator(sanitize_logit(logits[i]), row_max);
    const float inv_denom = 1.0f / softmax_denominator(score, E);
    for (int i = 0; i < E; ++i) score[i] = score[i] * inv_denom;
  } else {
    for (int i = 0; i < E; ++i) score[i] = moe_sigmoidf(sanitize_logit(logits[i]));
  }
  for (int i = 0; i < E; ++i) key[i] = selection_key(score[i], p.bias ? p.bias[i] : 0.0f);

  // Candidates: every expert, or only those of the best topk_group groups.
  int num_candidates = 0;
  const int G = p.num_expert_group;
  if (G > 1) {
    const int group_size = E / G;
    for (int g = 0; g < G; ++g) {
      float top1 = -INFINITY, top2 = -INFINITY;
      for (int i = g * group_size; i < (g + 1) * group_size; ++i) {
        if (key[i] > top1) {
          top2 = top1;
          top1 = key[i];
        } else if (key[i] > top2) {
          top2 = key[i];
        }
      }
      s.group_score[g] = group_size >= 2 ? top1 + top2 : top1;
      s.group_allowed[g] = 0;
    }
    for (int r = 0; r < p.topk_group; ++r) {
      int best = -1;
      for (int g = 0; g < G; ++g) {
        if (s.group_allowed[g]) continue;
        if (best < 0 || ranks_before(s.group_score[g], g, s.group_score[best], best)) best = g;
      }
      s.group_allowed[best] = 1;
    }
    for (int i = 0; i < E; ++i)
      if (s.group_allowed[i / group_size]) order[num_candidates++] = i;
  } else {
    for (int i = 0; i < E; ++i) order[num_candidates++] = i;
  }

  std::partial_sort(order, order + p.topk, order + num_candidates,
                    [key](int a, int b) { return ranks_before(key[a], a, key[b], b); });

  float selected_sum = 0.0f;
  for (int j = 0; j < p.topk; ++j) selected_sum += score[order[j]];
  for (int j = 0; j < p.topk; ++j) {
    ids[j] = order[j];
    weights[j] = finalize_weight(score[order[j]], selected_sum, p.renormalize, p.topk,
                                 p.routed_scaling_factor);
  }
}

// Size of sorted_token_ids for numel = T * topk ids: every id plus, for each expert that can be
// hit, at most block_size - 1 padding slots, rounded up to whole blocks.
inline int64_t align_max_padded(int64_t numel, int64_t num_experts, int64_t block_size) {
  const int64_t raw = numel + std::min(num_experts, numel) * (block_size - 1);
  return (raw + block_size - 1) / block_size * block_size;
}

// Destination expert slot of a routed id, or -1 when the id is skipped (outside [0, E), or mapped
// to no local expert).
inline int align_slot(int32_t id, int num_experts, const int32_t* expert_map) {
  if (id < 0 || id >= num_experts) return -1;
  if (expert_map && expert_map[id] < 0) return -1;
  return id;
}

}  // namespace moe_ext
