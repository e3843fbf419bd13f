// Router top-k gating on the GPU: one 32-lane group (a warp on NVIDIA) per token.
//
// Lane l holds experts l, l + 32, l + 64, ... in registers (kPerLane of them, a template
// parameter: E <= 32 * kPerLane, other lanes' slots masked off), so the scores never leave
// registers. The math is gating_math.h's, in the same order as the CPU kernel: the softmax
// denominator is each lane's strided partial sum followed by an xor butterfly, which is exactly the
// CPU's kReduceLanes tree, so ids and weights are bit-identical to the CPU kernel's. Softmax without
// correction bias or groups selects on the logits themselves (routing_host.h softmax_by_logit) and,
// renormalized, exponentiates only the chosen experts: one e^x a lane instead of kPerLane and no
// denominator (H200, bench/fused_ab.cu: fused E=256 top-8 T=1 3.14 -> 2.47 us, E=128 top-4 2.31 -> 2.01).
//
// Selection is a tournament over each lane's best two candidates: a lane ranks its slots once (key
// desc, index asc, as ranks_before), and each of the topk rounds is a warp arg-max of the lanes'
// current bests (two warp max-reductions: the best order-preserving key, then the lowest index among
// its holders; or, in the fused kernel at decode, one over the key's high bits and the index,
// checked, see select_rounds); only the winning lane moves on, to its second best, or, on every
// second win, ranks its remaining slots again under a warp-uniform branch. A round is about thirty
// instructions and no divergence. Measured on the H100 (bench/NOTES.md, topk_gating v7): rescanning
// every slot each round was 0.4 us slower at E=256/topk=8, a divergent pop 0.2 us, a ballot shortcut
// for the index 0.3 us, and sorting each lane's slots first 0.1-0.2 us. Where several warps share a
// multiprocessor and topk is 8 or more, a threshold selection with fewer instructions takes the
// rounds' place (select_threshold).
// Grouped top-k: when a group is exactly one slot of every lane (E == 32 * G: DeepSeek-V3's 256
// experts in 8 groups), it stays in registers: group j's score is the top two of slot j over the
// lanes (two warp max-reductions and a ballot), lane j ranks group j against the others, and a
// ballot gives the slots that stay. Other group sizes stage the keys in shared memory; 32 / G lanes score each
// group together (sum of the group's two best keys, merged across the lanes by shuffles),
// topk_group arg-max rounds pick the groups, and slots outside them leave the running.
#pragma once

#include <climits>
#include <cstdint>

#include "gating_math.h"
#include "routing_host.h"
#include "vec.cuh"

namespace moe_ext {

constexpr int kGateLanes = kReduceLanes;  // lanes per token; the butterfly width of the sum

// Order-preserving map of a float onto uint32 (NaN-free input): a < b exactly when the images are.
// Every real key maps above 0 (-inf maps to 0x007FFFFF), so 0 marks "no candidate".
MOE_DEVICE MOE_FORCEINLINE uint32_t ordered_key(float key) {
  const uint32_t u = __float_as_uint(key);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
MOE_DEVICE MOE_FORCEINLINE float from_ordered_key(uint32_t m) {
  return __uint_as_float((m & 0x80000000u) ? (m & 0x7FFFFFFFu) : ~m);
}

// Max of an unsigned 32-bit value over the 32 lanes of a token (one REDUX where they are the
// whole warp).
MOE_DEVICE MOE_FORCEINLINE uint32_t group_max_u32(uint32_t v) { return warp_max_u32<kGateLanes>(v); }

// Arg-max over the 32 lanes of (key, index) in ranks_before's order: the best ordered key, then the
// lowest index among its holders. `okey` 0 takes no part. Every lane returns the winner's index, and
// in `best` its key.
MOE_DEVICE MOE_FORCEINLINE int group_argmax(uint32_t okey, int idx, uint32_t& best) {
  best = group_max_u32(okey);
  return int(~group_max_u32(okey == best ? ~uint32_t(idx) : 0u));
}
MOE_DEVICE MOE_FORCEINLINE int group_argmax(uint32_t okey, int idx) {
  uint32_t best;
  return group_argmax(okey, idx, best);
}

// Max of a (non-NaN) float over the 32 lanes, exact.
MOE_DEVICE MOE_FORCEINLINE float group_max(float x) { return from_ordered_key(group_max_u32(ordered_key(x))); }

// Sum of a float over the 32 lanes by an xor butterfly: routing_host.h softmax_denominator's order, so the
// softmax denominator is the CPU's bit for bit (every lane gets the same value).
MOE_DEVICE MOE_FORCEINLINE float group_sum(float x) {
#pragma unroll
  for (int offset = kGateLanes / 2; offset > 0; offset /= 2) x = x + shfl_xor(x, offset, kGateLanes);
  return x;
}

// Bit l: pred of lane l of this token's 32 lanes.
MOE_DEVICE MOE_FORCEINLINE uint32_t group_ballot(bool pred) {
  return static_cast<uint32_t>(ballot(pred) >> (lane_id() & (kWarpSize - kGateLanes)));
}

// Grouped top-k with one group per slot (grouped_by_slot): returns the slots (bit j: group j) of the
// topk_group best groups, the same groups pick_groups chooses from the selection keys of the
// available slots. A group's score is top1 + top2 of its keys as a multiset (top2 = top1 when two
// lanes hold top1), summed in fp32 as pick_groups does.
template <int kPerLane>
MOE_DEVICE MOE_FORCEINLINE uint32_t groups_by_slot(const float (&key)[kPerLane], uint32_t avail, int G, int topk_group,
                                                   int lane) {
  uint32_t score[kPerLane];  // ordered group scores, 0 past G
  // Every slot is scored and the ones past G masked after, with no branch on G: the groups' chains (two
  // dependent warp reductions each) then interleave instead of running one basic block after another.
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const uint32_t okey = (avail >> j & 1) ? ordered_key(key[j]) : 0u;
    const uint32_t top1 = group_max_u32(okey);
    const bool holds = okey == top1;
    const uint32_t rest = group_max_u32(holds ? 0u : okey);
    const uint32_t top2 = popcount(moe_lane_mask_t(group_ballot(holds))) > 1 ? top1 : rest;
    const uint32_t s = ordered_key(from_ordered_key(top1) + from_ordered_key(top2));
    score[j] = j < G ? s : 0u;
  }
  // Lane j ranks group j: groups with a higher score, or an equal one and a lower index, go first.
  uint32_t mine = 0u;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) mine = lane == j ? score[j] : mine;
  int rank = 0;
#pragma unroll
  for (int h = 0; h < kPerLane; ++h) rank += (score[h] > mine) | ((score[h] == mine) & (h < lane));
  return group_ballot(lane < G && rank < topk_group);
}

// Whether grouped top-k runs in registers (groups_by_slot): each group is one slot of every lane
// (kPerLane, the power of two with kGateLanes * kPerLane >= E, is then at least G), and at most 8
// groups: from 16 slots a lane the fused kernel's 64 registers a thread spill, and more with this.
constexpr int kMaxGroupsBySlot = 8;
MOE_HOST_DEVICE MOE_FORCEINLINE bool grouped_by_slot(int E, int G) {
  return G > 1 && G <= kMaxGroupsBySlot && E == kGateLanes * G;
}

// Shared memory of one token's grouped top-k: keys [E] floats, then group scores [G] floats, then
// group flags [G] bytes (none when the groups stay in registers).
MOE_HOST_DEVICE MOE_FORCEINLINE int grouped_smem_bytes(int E, int G) {
  return G <= 1 || grouped_by_slot(E, G) ? 0 : (E + G) * 4 + ((G + 3) / 4) * 4;
}

// Grouped top-k, step 1: stage this lane's keys in s_key [E] (slot j is expert lane + 32 * j).
template <int kPerLane>
MOE_DEVICE MOE_FORCEINLINE void stage_keys(const float (&key)[kPerLane], uint32_t avail, int lane, float* s_key) {
#pragma unroll
  for (int j = 0; j < kPerLane; ++j)
    if (avail >> j & 1) s_key[lane + j * kGateLanes] = key[j];
}

// Grouped top-k, step 2 (one warp, after every key is staged): group scores and the topk_group
// best groups, flagged in s_allowed [G] bytes; s_group: [G] floats of scratch.
MOE_DEVICE MOE_FORCEINLINE void pick_groups(const GatingParams& p, int lane, const float* s_key, float* s_group,
                                            unsigned char* s_allowed) {
  const int E = p.num_experts, G = p.num_expert_group;
  const int group_size = E / G;
  for (int g = lane; g < G; g += kGateLanes) s_allowed[g] = 0;
  // Group scores: `parts` lanes (a power of two) share a group, each taking every parts-th key;
  // their best two keys merge by xor shuffles. Exact: top1 + top2 of the group as a multiset.
  int parts = 1;
  while (G * parts * 2 <= kGateLanes) parts *= 2;
  for (int g0 = 0; g0 < G; g0 += kGateLanes / parts) {  // warp-uniform
    const int g = g0 + lane / parts, q = lane % parts;
    float top1 = -INFINITY, top2 = -INFINITY;
    if (g < G) {
      for (int i = g * group_size + q; i < (g + 1) * group_size; i += parts) {
        const float k = s_key[i];
        top2 = fmaxf(top2, fminf(top1, k));
        top1 = fmaxf(top1, k);
      }
    }
    for (int offset = parts / 2; offset > 0; offset /= 2) {
      const float o1 = shfl_xor(top1, offset, kGateLanes), o2 = shfl_xor(top2, offset, kGateLanes);
      top2 = fmaxf(fminf(top1, o1), fmaxf(top2, o2));
      top1 = fmaxf(top1, o1);
    }
    if (g < G && q == 0) s_group[g] = group_size >= 2 ? top1 + top2 : top1;
  }
  sync_warp();
  // topk_group rounds of arg-max over the groups; lane l owns groups l, l + 32, ... (bit m).
  uint32_t group_taken = 0;
  for (int r = 0; r < p.topk_group; ++r) {
    uint32_t best = 0;  // this lane's best untaken group: ordered score, then lowest index (g ascends)
    int best_g = 0;
    for (int m = 0, g = lane; g < G; ++m, g += kGateLanes) {
      const uint32_t v = (group_taken >> m & 1) ? 0u : ordered_key(s_group[g]);
      if (v > best) {
        best = v;
        best_g = g;
      }
    }
    best_g = group_argmax(best, best_g);
    if (best_g % kGateLanes == lane) {
      group_taken |= 1u << (best_g / kGateLanes);
      s_allowed[best_g] = 1;
    }
  }
}

// Grouped top-k, step 3 (after step 2 is visible): slots outside the chosen groups leave the running.
template <int kPerLane>
MOE_DEVICE MOE_FORCEINLINE void mask_to_groups(const GatingParams& p, int lane,
                                               const unsigned char* s_allowed, uint32_t& avail) {
  // Group of expert i: floor((i + 0.5) / group_size) in fp32 is exact for E <= 1024 (the product's
  // error, under G * 2^-22, stays below the 0.5 / group_size margin to the next integer).
  const float inv_group = 1.0f / static_cast<float>(p.num_experts / p.num_expert_group);
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int g = static_cast<int>((static_cast<float>(lane + j * kGateLanes) + 0.5f) * inv_group);
    if ((avail >> j & 1) && !s_allowed[g]) avail &= ~(1u << j);
  }
}

// Shared scratch of grouped top-k for one token: keys [E] floats | group scores [G] floats | flags [G] bytes.
struct GroupedScratch {
  float* key;
  float* group;
  unsigned char* allowed;
  MOE_DEVICE GroupedScratch(char* smem, int E, int G)
      : key(reinterpret_cast<float*>(smem)), group(key + E), allowed(reinterpret_cast<unsigned char*>(group + G)) {}
};

// Loads slot j = expert lane + 32 * j of a row of E logits: the sanitized logit, the correction bias from
// `bias_row` (0 where it is null) and the avail bit (expert < E). Every load is unconditional so all of them are
// in flight at once. When every slot holds an expert (E = 32 * kPerLane: the common E, which the dispatch's power of
// two kPerLane fits exactly) they sit at fixed offsets from one address; otherwise each index is
// clamped to the row, about seven instructions of 64-bit address arithmetic a slot ahead of its load.
template <typename T, int kPerLane>
MOE_DEVICE MOE_FORCEINLINE void load_slots(const T* __restrict__ row, int E, const float* __restrict__ bias_row,
                                           int lane, float (&logit)[kPerLane], float (&bias)[kPerLane],
                                           uint32_t& avail) {
  if (E == kGateLanes * kPerLane) {  // warp-uniform
    const T* __restrict__ mine = row + lane;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) logit[j] = sanitize_logit(to_float(mine[j * kGateLanes]));
    avail = kPerLane >= 32 ? ~0u : (1u << (kPerLane % 32)) - 1u;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) bias[j] = bias_row ? bias_row[lane + j * kGateLanes] : 0.0f;
    return;
  }
  avail = 0;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int i = lane + j * kGateLanes;
    const float x = to_float(row[i < E ? i : E - 1]);
    logit[j] = i < E ? sanitize_logit(x) : -INFINITY;
    avail |= (i < E ? 1u : 0u) << j;
  }
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int i = lane + j * kGateLanes;
    bias[j] = bias_row ? bias_row[i < E ? i : E - 1] : 0.0f;
  }
}

// moe_sigmoidf of every slot, bit for bit. On NVIDIA GPUs the division 1 / y (y = 1 + e^-x >= 1)
// compiles to a branch per slot around its fast path, MUFU.RCP and one FMA Newton step, which the
// compiler takes (and which is the correctly rounded reciprocal) for y below 2^126; that fast path
// is written out here without the branch, so the slots' chains interleave (0.34 us off the DeepSeek-V3
// fused routing kernel on the H200, bench/NOTES.md topk_gating v9), and only a lane with an available
// slot's y at 2^126 or more (x < -87.3, or a NaN logit: y = +inf) takes the division. Slots not in
// `avail` get 0.
template <int kPerLane>
MOE_DEVICE MOE_FORCEINLINE void sigmoid_slots(float (&x)[kPerLane], uint32_t avail) {
#if defined(__CUDA_ARCH__) && !defined(__HIP_PLATFORM_AMD__)
  float y[kPerLane];
  bool slow = false;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    y[j] = 1.0f + moe_expf(-x[j]);
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y[j]));
    const bool on = avail >> j & 1;
    x[j] = on ? fmaf(r, fmaf(-y[j], r, 1.0f), r) : 0.0f;
    slow |= on && !(y[j] < 0x1p126f);
  }
  if (slow) {
#pragma unroll
    for (int j = 0; j < kPerLane; ++j)
      if ((avail >> j & 1) && !(y[j] < 0x1p126f)) x[j] = 1.0f / y[j];
  }
#else
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) x[j] = (avail >> j & 1) ? moe_sigmoidf(x[j]) : 0.0f;
#endif
}

// Selection keys of the available slots (-inf elsewhere).
template <int kPerLane>
MOE_DEVICE MOE_FORCEINLINE void slot_keys(const float (&score)[kPerLane], const float (&bias)[kPerLane], uint32_t avail,
                                          float (&key)[kPerLane]) {
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) key[j] = (avail >> j & 1) ? selection_key(score[j], bias[j]) : -INFINITY;
}

// One candidate of a lane: ordered key (0: none) and slot j (expert lane + 32 * j).
struct LaneCandidate {
  uint32_t key;
  int slot;
};

// A lane's best two slots among those ranking below slot `below_slot` with ordered key `below_key`
// (below_key 0xFFFFFFFF: all of them). Slots ascend with the expert index, so a strict comparison
// keeps the lower index first on equal keys, as ranks_before does.
template <int kPerLane>
MOE_DEVICE MOE_FORCEINLINE void lane_best_two(const uint32_t (&okey)[kPerLane], uint32_t below_key, int below_slot,
                                              LaneCandidate& first, LaneCandidate& second) {
  LaneCandidate b1{0u, 0}, b2{0u, 0};
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const bool eligible = (okey[j] < below_key) | ((okey[j] == below_key) & (j > below_slot));  // no branches
    const uint32_t k = eligible ? okey[j] : 0u;
    const bool over_first = k > b1.key, over_second = k > b2.key;  // selects, no branches
    b2.key = over_first ? b1.key : (over_second ? k : b2.key);
    b2.slot = over_first ? b1.slot : (over_second ? j : b2.slot);
    b1.key = over_first ? k : b1.key;
    b1.slot = over_first ? j : b1.slot;
  }
  first = b1;
  second = b2;
}

// Bits of an expert index of a lane group holding kPerLane slots a lane (E <= 32 * kPerLane).
template <int kPerLane>
constexpr int kIndexBits = kPerLane >= 32 ? 10 : kPerLane >= 16 ? 9 : kPerLane >= 8 ? 8 : kPerLane >= 4 ? 7
                           : kPerLane >= 2 ? 6 : 5;

// One pass of topk selection rounds (see select_rounds). kPacked: each round is one warp max of the
// key's high bits with the inverted index in its low kIndexBits (higher key, then lower index, wins),
// so a round waits on one reduction instead of two. That winner is the true one unless another lane
// holds the same high bits with a larger full key; each lane checks that against the winner's key
// (a shuffle off the rounds' chain) and the pass returns false if any lane saw it (warp-uniform).
template <int kPerLane, bool kLookahead, bool kPacked>
MOE_DEVICE MOE_FORCEINLINE bool selection_pass(const uint32_t (&okey)[kPerLane], int topk, int lane, int& my_id,
                                               uint32_t& my_key) {
  constexpr uint32_t kIndexMask = (1u << kIndexBits<kPerLane>) - 1;
  LaneCandidate best, next;  // `next`: unused with the lookahead
  lane_best_two(okey, 0xFFFFFFFFu, -1, best, next);
  int wins = 0;
  bool wrong = false;  // kPacked: a round's winner may not be the arg-max
  my_id = -1;
  my_key = 0u;
  for (int r = 0; r < topk; ++r) {
    LaneCandidate after, unused;  // kLookahead: the candidate after this lane's best
    if constexpr (kLookahead) lane_best_two(okey, best.key, best.slot, after, unused);
    const int idx = lane + best.slot * kGateLanes;
    int winner;
    uint32_t winner_key;
    if constexpr (kPacked) {
      const uint32_t high = best.key & ~kIndexMask;
      const uint32_t top = group_max_u32(best.key ? high | (kIndexMask - uint32_t(idx)) : 0u);
      winner = int(kIndexMask - (top & kIndexMask));
      winner_key = shfl(best.key, winner & (kGateLanes - 1), kGateLanes);
      wrong |= high == (top & ~kIndexMask) && best.key > winner_key;
    } else {
      winner = group_argmax(best.key, idx, winner_key);
    }
    const int owner = winner & (kGateLanes - 1);  // winner >= 0; kGateLanes is a power of two
    if (lane == r) my_id = winner;
    if (lane == r || r == 0) my_key = winner_key;  // lanes past topk keep rank 0's (select_rounds)
    // The owner moves on (every candidate ranking above the winner is already taken). With the
    // lookahead, to the candidate found during this round. Without it, to its second best on an odd
    // win, by ranking its remaining slots again on an even one: selects, and a warp-uniform branch for
    // the rare re-rank, so the warp never diverges.
    const bool mine = lane == owner;
    if constexpr (kLookahead) {
      if (mine) best = after;
      continue;
    }
    wins += mine ? 1 : 0;
    const bool rerank = mine && (wins & 1) == 0;
    if (mine && !rerank) best = next;
    if (any_lane(rerank)) {
      LaneCandidate b1, b2;
      lane_best_two(okey, best.key, best.slot, b1, b2);
      if (rerank) {
        best = b1;
        next = b2;
      }
    }
  }
  return !(kPacked && any_lane(wrong));
}

// topk rounds of warp arg-max over this warp's available slots (ordered keys `okey`, 0 where not
// available; at least topk available). Lane r < topk returns round r's winner (expert id) and its
// ordered key; other lanes -1 and rank 0's key, so the callers' math on them (scores derived from
// the key, the weight's division) stays in normal range: a NaN there (key 0) sent every token's
// division down its slow path (H200, bench/fused_ab.cu: 0.3 us at E=256 top-8 T=1). The callers derive
// the scores (chosen_score), so no score rides along the rounds.
// Exact rounds take two warp max-reductions each (the best key, then the lowest index among its
// holders). `packed` runs packed rounds first (one reduction each) and the exact ones only when a
// packed round may have erred: two lanes' candidates agreeing in all but the key's low kIndexBits
// bits, which distinct bf16 or fp16 softmax logits never give (their scores differ by more) and equal
// keys do not trouble (the index breaks the tie in both). Packed rounds are a few instructions longer
// (the check) and one reduction shorter. H200, bench/fused_ab.cu (bench/NOTES.md topk_gating v10): the
// fused single block 0.05-0.1 us faster with them up to 8 tokens (softmax), slower at 12-16 tokens,
// with grouped top-k and in the grid kernel (8-32 warps a multiprocessor share the issue slots); the
// router's lookahead rounds 0.06 slower; the router without the lookahead 0.08-0.12 faster, but still
// behind the lookahead from 2 tokens. So only the fused single block passes `packed`.
// kLookahead: every lane finds the candidate after its current best during each round's reductions
// (its slots are in registers, the warp's issue slots idle while REDUX is in flight), so the winner
// moves on with a select and no round has a vote or a branch. More instructions a round: the router
// takes it for small grids only, where one warp's chain is the time, and the fused single block below
// topk 8 (fused_rounds).
template <int kPerLane, bool kLookahead = false>
MOE_DEVICE MOE_FORCEINLINE void select_rounds(const uint32_t (&okey)[kPerLane], int topk, int lane, bool packed,
                                              int& my_id, uint32_t& my_key) {
  const bool done = packed && selection_pass<kPerLane, kLookahead, true>(okey, topk, lane, my_id, my_key);
  if (!done) selection_pass<kPerLane, kLookahead, false>(okey, topk, lane, my_id, my_key);
}

// Shared scratch of select_threshold for one token's 32 lanes (a kernel holds one a lane group).
// The threshold selection pays from topk 8 (below, its fixed cost outweighs the rounds it saves:
// H200, E=256 top-4 and E=128 top-4 routers 0.06-0.7 us slower at T = 64-16384, bench/NOTES.md v13).
constexpr int kSelectThresholdMinTopk = 8;
struct SelectScratch {
  uint64_t order[kGateLanes];  // candidates: (ordered key << 32) | ~index, larger first as ranks_before
};

// Selection of the topk best slots by a threshold instead of topk rounds: the same outputs as
// select_rounds (lane r < topk: rank r's expert and ordered key). If topk lanes each hold a slot at or
// above a key, at least topk slots are, so the topk-th largest of the lanes' best keys (found by topk
// rounds of one warp max that drop every holder of it: a lower bound under ties) bounds the topk-th
// best key from below. Every slot at or above it is a candidate (topk plus ~1 on random logits at E=256
// top-8); the candidates go to shared memory in lane order (ballots give each lane's offset), each ranks
// itself against all of them (key desc, index asc), and rank r's lane takes the output. Returns false,
// with nothing written, when more than kGateLanes slots pass the bound (many equal keys): the caller then
// runs the rounds.
// A round here is three instructions against the rounds' ~30, but the candidates' trip through shared
// memory costs more than that saves for one warp alone: H200 (bench/NOTES.md topk_gating v13), E=256 top-8
// T=1 fused 3.32 against 3.15 us, router 2.65 against 2.58 (bench/fused_ab.cu). Where warps share the issue
// slots, instruction count is the time and it is faster at topk 8: the fused single block from 5 tokens
// (T=8 3.82 against 4.07 us, T=16 4.78 against 5.24; DeepSeek-V3 grouped T=4 3.97 against 4.22), the router's
// large grids (E=256 top-8 T=4096 6.70 against 7.83 us). So the callers pass a scratch only there (gate_token
// also wants topk >= kSelectThresholdMinTopk).
template <int kPerLane>
MOE_DEVICE MOE_FORCEINLINE bool select_threshold(const uint32_t (&okey)[kPerLane], int topk, int lane,
                                                 SelectScratch& s, int& my_id, uint32_t& my_key) {
  uint32_t lane_key = 0u, cut = 0u;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) lane_key = max(lane_key, okey[j]);
  for (int r = 0; r < topk; ++r) {
    cut = group_max_u32(lane_key);
    lane_key = lane_key == cut ? 0u : lane_key;
  }
  const uint32_t bound = cut > 1u ? cut : 1u;  // key 0: not available
  int count = 0;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) count += okey[j] >= bound ? 1 : 0;
  // Candidates in lanes below this one, and in all: ballot i holds the lanes with more than i.
  const uint32_t below = (1u << lane) - 1u;
  int pos = 0, n = 0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const uint32_t b = group_ballot(count > i);
    pos += __popc(b & below);
    n += __popc(b);
  }
  if (n > kGateLanes || n < topk) return false;  // warp-uniform; n < topk: fewer slots than topk, the rounds decide
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    if (okey[j] >= bound) {
      s.order[pos] = (uint64_t(okey[j]) << 32) | ~uint32_t(lane + j * kGateLanes);
      ++pos;
    }
  }
  sync_warp();
  const uint64_t me = lane < n ? s.order[lane] : 0u;
  int rank = 0;
#pragma unroll 4
  for (int d = 0; d < n; ++d) rank += s.order[d] > me ? 1 : 0;
  sync_warp();  // every candidate read before rank r's entry is overwritten
  if (lane < n && rank < topk) s.order[rank] = me;
  sync_warp();
  const uint64_t o = s.order[lane < topk ? lane : 0];  // lanes past topk: rank 0's key, as select_rounds
  my_id = lane < topk ? int(~uint32_t(o)) : -1;
  my_key = uint32_t(o >> 32);
  sync_warp();  // the scratch is free for the group's next token
  return true;
}

// The selection of gate_token: the threshold where the caller passed its scratch and topk is large
// enough (select_threshold), the rounds otherwise or when it declines (select_rounds).
template <int kPerLane, bool kLookahead = false>
MOE_DEVICE MOE_FORCEINLINE void select_top(const uint32_t (&okey)[kPerLane], int topk, int lane, bool packed_rounds,
                                           SelectScratch* select, int& my_id, uint32_t& my_key) {
  bool done = false;
  if constexpr (kPerLane <= 8) {
    if (select != nullptr && topk >= kSelectThresholdMinTopk)
      done = select_threshold(okey, topk, lane, *select, my_id, my_key);
  }
  if (!done) select_rounds<kPerLane, kLookahead>(okey, topk, lane, packed_rounds, my_id, my_key);
}

// The softmax numerator of slot j, 0 where the slot holds no expert, with no branch: the numerator is finite
// (at most 1), so multiplying it by the avail bit is exact. Written as a select, the compiler branched around
// each slot's e^x, one basic block a slot run after another (the softmax with bias or groups, and without
// renormalize); branch-free, the slots' exps interleave.
MOE_DEVICE MOE_FORCEINLINE float slot_numerator(float x, float row_max, uint32_t avail, int j) {
  return softmax_numerator(x, row_max) * static_cast<float>(avail >> j & 1);
}

// Score of expert `id` (lane id % 32's slot id / 32) from the lane that holds it: every lane of the group
// takes part (shuffles).
template <int kPerLane>
MOE_DEVICE MOE_FORCEINLINE float chosen_score(const float (&score)[kPerLane], int id) {
  const int owner = id & (kGateLanes - 1), slot = id / kGateLanes;
  float v = 0.0f;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const float s = shfl(score[j], owner, kGateLanes);
    v = slot == j ? s : v;
  }
  return v;
}

// Sum of lane r's x over r < topk in rank order (the CPU's order), where `needed` (renormalize); 0 otherwise.
MOE_DEVICE MOE_FORCEINLINE float rank_order_sum(float x, int topk, bool needed) {
  float sum = 0.0f;
  if (needed)
    for (int r = 0; r < topk; ++r) sum += shfl(x, r, kGateLanes);
  return sum;
}

// The gating path an instance is compiled for (gate_token): the logit path of softmax without bias or groups
// (softmax_by_logit), renormalized (DeepSeek-R1, Qwen3, GPT-OSS, Mixtral) or over every numerator (Qwen1.5 and
// Qwen2-MoE), or the score path (sigmoid, a correction bias, expert groups).
enum class GatePath : int { kScore = 0, kLogit = 1, kLogitRenorm = 2 };
MOE_HOST_DEVICE MOE_FORCEINLINE GatePath gate_path(const GatingParams& p) {
  if (!softmax_by_logit(p)) return GatePath::kScore;
  return p.renormalize ? GatePath::kLogitRenorm : GatePath::kLogit;
}

// The logit path of gate_token (softmax_by_logit: softmax with no correction bias and no groups): the sanitized
// logits are the keys (routing_host.h), and only the numerators the weights need are computed. kRenormalize is
// p.renormalize, fixed by the instance.
template <typename T, int kPerLane, bool kLookahead, bool kRenormalize>
MOE_DEVICE MOE_FORCEINLINE void gate_by_logit(const T* __restrict__ row, const GatingParams& p, int lane,
                                              bool packed_rounds, SelectScratch* select, float& out_weight,
                                              int& out_id) {
  float score[kPerLane], unused_bias[kPerLane];
  uint32_t avail;  // bit j: slot j holds an expert
  load_slots<T, kPerLane>(row, p.num_experts, /*bias_row=*/nullptr, lane, score, unused_bias, avail);  // no bias here
  uint32_t okey[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) okey[j] = (avail >> j & 1) ? ordered_key(score[j]) : 0u;
  uint32_t my_key;
  select_top<kPerLane, kLookahead>(okey, p.topk, lane, packed_rounds, select, out_id, my_key);
  const float my_logit = from_ordered_key(my_key);  // lanes past topk: rank 0's, unused
  const float row_max = shfl(my_logit, 0, kGateLanes);  // rank 0's logit is the row's largest
  const float e = softmax_numerator(my_logit, row_max);
  float inv_denom = 1.0f;
  const float selected_sum = rank_order_sum(e, p.topk, kRenormalize);
  if constexpr (!kRenormalize) {  // every numerator, summed as softmax_denominator does
    float partial = 0.0f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j)
      partial += slot_numerator(score[j], row_max, avail, j);
    inv_denom = 1.0f / group_sum(partial);
  }
  out_weight = finalize_weight(kRenormalize ? e : e * inv_denom, selected_sum, kRenormalize, p.topk,
                               p.routed_scaling_factor);
}

// The score path of gate_token: sigmoid, or softmax with a correction bias or expert groups. The scores are
// computed, biased into keys, masked to the chosen groups, and the top-k taken of the keys.
template <typename T, int kPerLane, bool kLookahead, typename SmemOf>
MOE_DEVICE MOE_FORCEINLINE void gate_by_score(const T* __restrict__ row, const GatingParams& p, int lane,
                                              SmemOf smem_of, bool packed_rounds, SelectScratch* select,
                                              float& out_weight, int& out_id) {
  float score[kPerLane], bias[kPerLane], key[kPerLane];
  uint32_t avail;  // bit j: slot j holds an expert that may still be chosen
  load_slots<T, kPerLane>(row, p.num_experts, p.bias, lane, score, bias, avail);
  if (p.scoring == ScoringFunc::kSoftmax) {
    float lane_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) lane_max = fmaxf(lane_max, score[j]);
    const float row_max = group_max(lane_max);
    float partial = 0.0f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      score[j] = slot_numerator(score[j], row_max, avail, j);
      partial += score[j];  // + 0 for empty slots: exact
    }
    const float inv_denom = 1.0f / group_sum(partial);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) score[j] = score[j] * inv_denom;
  } else {
    sigmoid_slots(score, avail);
  }
  slot_keys(score, bias, avail, key);
  if (p.num_expert_group > 1) {
    bool in_registers = false;
    if constexpr (kPerLane <= kMaxGroupsBySlot) {
      in_registers = grouped_by_slot(p.num_experts, p.num_expert_group);
      if (in_registers) avail &= groups_by_slot(key, avail, p.num_expert_group, p.topk_group, lane);
    }
    if (!in_registers) {
      GroupedScratch g(smem_of(), p.num_experts, p.num_expert_group);
      stage_keys(key, avail, lane, g.key);
      sync_warp();
      pick_groups(p, lane, g.key, g.group, g.allowed);
      sync_warp();
      mask_to_groups<kPerLane>(p, lane, g.allowed, avail);
      sync_warp();  // the scratch may be reused by the caller
    }
  }
  uint32_t okey[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) okey[j] = (avail >> j & 1) ? ordered_key(key[j]) : 0u;
  uint32_t my_key;
  select_top<kPerLane, kLookahead>(okey, p.topk, lane, packed_rounds, select, out_id, my_key);
  // The chosen expert's score: without a correction bias its key is the score itself (score + 0, and a
  // softmax or sigmoid score is never NaN, -0 or above FLT_MAX); with one, the owner lane's slot.
  float my_score;
  if (p.bias == nullptr) {
    my_score = from_ordered_key(my_key);  // lanes past topk: rank 0's, unused
  } else {  // lanes past topk (id -1) take rank 0's score too, never a tiny one for finalize_weight's division
    const int rank0_id = shfl(out_id, 0, kGateLanes);
    my_score = chosen_score(score, lane < p.topk ? out_id : rank0_id);
  }
  out_weight = finalize_weight(my_score, rank_order_sum(my_score, p.topk, p.renormalize), p.renormalize, p.topk,
                               p.routed_scaling_factor);
}

// Gating of one token by one warp. `row` is the token's logits; `kPath`: the one path the instance holds, launched
// where gate_path(p) is kPath (dispatch_gate_path, csrc/cuda/routing.cu). One path, renormalize fixed on the logit
// path, is about half the code of all of them (the fused single block's logit instance at E=256: 2776 SASS
// instructions against 6608) and measured faster: routers 0.07-0.2 us, the fused single block up to 0.23 (H200,
// bench/fused_ab.cu, session 22). `smem_of()` returns this token's grouped-top-k scratch, grouped_smem_bytes(E,
// G), called only where grouped top-k needs it (not for groups in registers nor without groups): the fused single
// block computes the address there, off the path to the logits' loads (DeepSeek-V3 fused T=1 0.08 us,
// bench/fused_ab.cu session 21); `packed_rounds`: see select_rounds; `select`: this lane group's scratch for
// select_threshold, taken at topk >= kSelectThresholdMinTopk and up to 8 slots a lane (a ballot a slot), or null
// for the rounds. Lane r < topk returns rank r's final weight and expert id.
template <typename T, int kPerLane, GatePath kPath, bool kLookahead = false, typename SmemOf>
MOE_DEVICE MOE_FORCEINLINE void gate_token(const T* __restrict__ row, const GatingParams& p, int lane, SmemOf smem_of,
                                           bool packed_rounds, SelectScratch* select, float& out_weight,
                                           int& out_id) {
  if constexpr (kPath != GatePath::kScore)
    gate_by_logit<T, kPerLane, kLookahead, kPath == GatePath::kLogitRenorm>(row, p, lane, packed_rounds, select,
                                                                            out_weight, out_id);
  else
    gate_by_score<T, kPerLane, kLookahead>(row, p, lane, smem_of, packed_rounds, select, out_weight, out_id);
}

// One token per 32-lane group, kGroupsPerBlock groups per block.
constexpr int kGateGroupsPerBlock = 4;
constexpr int kGateEarlyTriggerBlocks = 32;  // up to 128 tokens

template <typename T, int kPerLane, GatePath kPath, bool kLookahead = false>
__global__ void __launch_bounds__(kGateGroupsPerBlock* kGateLanes)
    topk_gating_kernel(const T* __restrict__ logits, int64_t row_stride, int num_tokens, GatingParams p,
                       float* __restrict__ weights, int32_t* __restrict__ ids) {
  extern __shared__ __align__(16) char gate_smem[];
  __shared__ SelectScratch s_select[kGateGroupsPerBlock];
  // A kernel queued behind this one with programmatic dependent launch (alignment, the expert
  // GEMVs) may start once every block here has triggered, and waits there for these results;
  // kernels launched without it are unaffected. A small grid (decode) triggers at once, so the next
  // launch overlaps all of this one; a large grid triggers after its stores (on the H100, router
  // calls of 256+ blocks that triggered at once ran up to 30% slower back to back). This kernel,
  // launched so, waits for the kernel ahead of it (which writes the logits).
  const bool early = gridDim.x <= kGateEarlyTriggerBlocks;
  if (early) grid_dependents_launch();
  grid_dependency_wait();
  const int group = threadIdx.x / kGateLanes;
  const int lane = threadIdx.x % kGateLanes;
  const int t = blockIdx.x * kGateGroupsPerBlock + group;
  if (t >= num_tokens) return;  // a whole group leaves together
  // The grouped scratch's address computed up front, as before gate_token took a callable: computed in the grouped
  // branch instead it measured 0.06 us slower here (DeepSeek-V3 router, bench/fused_ab.cu session 21), where the
  // fused single block gained 0.05-0.08.
  char* const group_smem = gate_smem + group * grouped_smem_bytes(p.num_experts, p.num_expert_group);
  const auto smem = [group_smem] { return group_smem; };
  float w;
  int id;
  gate_token<T, kPerLane, kPath, kLookahead>(logits + t * row_stride, p, lane, smem, /*packed_rounds=*/false,
                                             kLookahead ? nullptr : &s_select[group], w, id);
  if (lane < p.topk) {
    weights[int64_t(t) * p.topk + lane] = w;
    ids[int64_t(t) * p.topk + lane] = id;
  }
  if (!early) grid_dependents_launch();
}

}  // namespace moe_ext
