// Block alignment by expert on the GPU (vLLM's moe_align_block_size layout), deterministic:
// within each expert the flat indices ascend.
//
// The ids are cut into contiguous segments, one per warp (and, for many ids, one set of warps per
// block-sized chunk). Order inside a segment comes from walking it a warp-width at a time with
// match_any (rank = peers in lower lanes); order across segments from an exclusive scan, per
// expert, of the segments' counts. So no atomic ever decides a position:
//   1. count: each warp counts its segment's ids per expert (shared atomics: order-free sums);
//   2. scan: per expert, across segments (chunks, then warps), plus the padded per-expert offsets;
//   3. scatter: each warp walks its segment and writes every id at base + rank.
// Five paths, by size (the launcher, csrc/cuda/routing.cu, picks; E <= 1024, slots fit 11 bits):
// - from 512 ids up to a block of whole tokens a multiprocessor, one cooperative launch
//   (moe_align_coop_kernel, at the end of this file): token bit masks rank each block's ids, one grid
//   barrier shares the blocks' per-expert counts; the automatic choice wherever it fits;
// - up to 1024 ids, one block (moe_align_small_kernel): ranks ids within each expert's run instead;
// - up to 4096 ids where the masks fit, one block (moe_align_rows_kernel): ranks from token masks;
// - up to 32768 ids, one launch over a grid (moe_align_grid_kernel): each block does step 1 for
//   all the ids (the counts before and after its chunk too) and step 2 redundantly, then step 3
//   for its chunk; no workspace, no memset, no block waits on another;
// - any size, two launches over chunks (moe_align_count_kernel, moe_align_place_kernel) with an
//   int32 workspace [E, chunks rounded up to 4]: step 1 per chunk, then steps 2 and 3, each block
//   summing the table itself.
// Every kernel here waits for the kernel ahead of it before it touches global memory
// (grid_dependency_wait), so the launchers may use programmatic dependent launch.
#pragma once

#include <cstdint>

#include "../core/compat.h"

namespace moe_ext {

constexpr int kAlignMatchBits = 11;            // slots are -1 .. 1023
constexpr int kAlignSmemInts = 48 * 1024 / 4;  // static-limit shared memory, in ints

MOE_DEVICE MOE_FORCEINLINE int align_slot_device(int32_t id, int E, const int32_t* __restrict__ expert_map) {
  if (id < 0 || id >= E) return -1;
  if (expert_map && expert_map[id] < 0) return -1;
  return id;
}

// Exclusive scan across the block of one value a thread (blockDim a multiple of the warp): a warp
// scan, then every thread adds the totals of the warps before its own, so one barrier; `total` gets
// the block's sum. scratch: >= blockDim / kWarpSize elements of T, reusable after a barrier.
template <typename T>
MOE_DEVICE MOE_FORCEINLINE T block_scan_one(T v, T* scratch, T& total) {
  const int warp = threadIdx.x / kWarpSize, num_warps = blockDim.x / kWarpSize;
  const T incl = warp_inclusive_scan(v);
  if (lane_id() == kWarpSize - 1) scratch[warp] = incl;
  __syncthreads();
  T before = 0;
  total = 0;
  for (int w = 0; w < num_warps; ++w) {
    const T t = scratch[w];
    before += w < warp ? t : T(0);
    total += t;
  }
  return before + incl - v;
}

// Exclusive scan of vals[0..n) in place by the whole block; returns the total to every thread.
// Thread t scans a contiguous range of vals; scratch: >= kWarpSize elements of T.
template <typename T>
MOE_DEVICE T block_exclusive_scan(T* vals, int n, T* scratch) {
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int per = (n + nthreads - 1) / nthreads;
  const int begin = min(n, tid * per), end = min(n, begin + per);
  T local = 0;
  for (int i = begin; i < end; ++i) local += vals[i];
  T total;
  T run = block_scan_one(local, scratch, total);  // of the per-thread sums
  for (int i = begin; i < end; ++i) {
    const T v = vals[i];
    vals[i] = run;
    run += v;
  }
  __syncthreads();
  return total;
}

// Ids are read kAlignBatch warp-rounds at a time, all loads issued before the first use.
constexpr int kAlignBatch = 8;

// Ids in each warp's segment when `num_warps` warps split n ids: whole warp-rounds, contiguous.
MOE_DEVICE MOE_FORCEINLINE int warp_segment_length(int n, int num_warps) {
  return ((n + num_warps - 1) / num_warps + kWarpSize - 1) / kWarpSize * kWarpSize;
}

// Segment of warp `warp` among `num_warps` over [begin, end) (empty for warp >= num_warps).
MOE_DEVICE MOE_FORCEINLINE void warp_segment(int begin, int end, int num_warps, int warp, int& s0, int& s1) {
  const int seg = warp_segment_length(end - begin, num_warps);
  s0 = min(end, begin + warp * seg);
  s1 = min(end, s0 + seg);
}

MOE_DEVICE MOE_FORCEINLINE void load_slots(const int32_t* __restrict__ ids, int base, int s1, int E,
                                           const int32_t* __restrict__ expert_map, int (&slot)[kAlignBatch]) {
  int32_t id[kAlignBatch];
#pragma unroll
  for (int r = 0; r < kAlignBatch; ++r) {
    const int f = base + r * kWarpSize + lane_id();
    id[r] = f < s1 ? ids[f] : -1;
  }
#pragma unroll
  for (int r = 0; r < kAlignBatch; ++r) slot[r] = align_slot_device(id[r], E, expert_map);
}

// Step 1 for one block: warp w counts its segment's ids into counts[w * E + slot].
MOE_DEVICE MOE_FORCEINLINE void count_segments(const int32_t* __restrict__ ids, int begin, int end, int E,
                                               const int32_t* __restrict__ expert_map, int* counts) {
  const int num_warps = blockDim.x / kWarpSize, warp = threadIdx.x / kWarpSize;
  int s0, s1;
  warp_segment(begin, end, num_warps, warp, s0, s1);
  for (int base = s0; base < s1; base += kAlignBatch * kWarpSize) {
    int slot[kAlignBatch];
    load_slots(ids, base, s1, E, expert_map, slot);
#pragma unroll
    for (int r = 0; r < kAlignBatch; ++r)
      if (slot[r] >= 0) atomicAdd(&counts[warp * E + slot[r]], 1);
  }
}

// Step 3 for one block: warp w < num_warps writes each id of its segment at base[slot] (0 when base
// is null) + cursor[w * E + slot] + rank, rank = same-slot ids before it in the segment (match_any
// within each warp-round, in round order). Warps from num_warps on have no segment.
MOE_DEVICE MOE_FORCEINLINE void scatter_segments(const int32_t* __restrict__ ids, int begin, int end, int num_warps,
                                                 int E, const int32_t* __restrict__ expert_map, int* cursor,
                                                 const int* base, int32_t* __restrict__ sorted) {
  const int warp = threadIdx.x / kWarpSize;
  if (warp >= num_warps) return;  // warp-uniform
  int s0, s1;
  warp_segment(begin, end, num_warps, warp, s0, s1);
  int* my = cursor + warp * E;
  for (int f0 = s0; f0 < s1; f0 += kAlignBatch * kWarpSize) {  // warp-uniform trip count
    int slot[kAlignBatch];
    load_slots(ids, f0, s1, E, expert_map, slot);
#pragma unroll
    for (int r = 0; r < kAlignBatch; ++r) {
      if (f0 + r * kWarpSize >= s1) break;  // warp-uniform
      const moe_lane_mask_t peers = match_any<kAlignMatchBits>(slot[r]);
      const int rank = popcount(peers & lanemask_lt());
      if (slot[r] >= 0)
        sorted[(base ? base[slot[r]] : 0) + my[slot[r]] + rank] = static_cast<int32_t>(f0 + r * kWarpSize + lane_id());
      sync_warp();
      if (slot[r] >= 0 && rank == 0) my[slot[r]] += popcount(peers);
      sync_warp();
    }
  }
}

// Exclusive running sum down column s of a [rows, E] table, in place, starting from `run`; returns
// the column's end. Loads go 8 rows at a time before the sums (one dependent load a row is slow).
template <typename Int>
MOE_DEVICE MOE_FORCEINLINE int column_exclusive_sum(Int* table, int rows, int E, int s, int run) {
  for (int r0 = 0; r0 < rows; r0 += 8) {
    int c[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) c[k] = r0 + k < rows ? table[(r0 + k) * E + s] : 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (r0 + k < rows) table[(r0 + k) * E + s] = run;
      run += c[k];
    }
  }
  return run;
}

// Turns counts[w * E + s] into cursors: base[s] + ids of slot s in warps before w.
MOE_DEVICE MOE_FORCEINLINE void counts_to_cursors(int* counts, int E, const int32_t* __restrict__ base) {
  for (int s = threadIdx.x; s < E; s += blockDim.x) column_exclusive_sum(counts, blockDim.x / kWarpSize, E, s, base[s]);
}

// Writes expert_ids for blocks [first, num_blocks) by stride, from exclusive padded offsets[0..E)
// (in smem) and their total: a binary search a block, so a hot expert's many blocks spread over threads.
MOE_DEVICE MOE_FORCEINLINE void write_expert_ids(const int* offsets, int total, int E, int block_size, int num_blocks,
                                                 const int32_t* __restrict__ expert_map, int32_t* __restrict__ expert_ids,
                                                 int first, int stride) {
  for (int b = first; b < num_blocks; b += stride) {
    const int pos = b * block_size;
    int e = -1;
    if (pos < total) {
      int lo = 0, hi = E - 1;  // last e with offsets[e] <= pos (pos < total: never past E - 1)
      while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (offsets[mid] <= pos) lo = mid; else hi = mid - 1;
      }
      e = expert_map ? expert_map[lo] : lo;
    }
    expert_ids[b] = e;
  }
}

// Counts -> padded exclusive offsets in place (offsets[E] = total); writes num_tokens_post_padded
// unless it is null.
MOE_DEVICE MOE_FORCEINLINE void pad_and_scan(int* offsets, int E, int block_size, int* scan_scratch,
                                             int32_t* __restrict__ num_post_padded) {
  if (E <= static_cast<int>(blockDim.x)) {  // a thread an expert: the scan of one value a thread
    const int tid = threadIdx.x;
    const int c = tid < E ? offsets[tid] : 0;
    int total;
    const int offset = block_scan_one((c + block_size - 1) / block_size * block_size, scan_scratch, total);
    if (tid < E) offsets[tid] = offset;
    if (tid == 0) {
      offsets[E] = total;
      if (num_post_padded) *num_post_padded = total;
    }
    __syncthreads();
    return;
  }
  for (int s = threadIdx.x; s < E; s += blockDim.x) offsets[s] = (offsets[s] + block_size - 1) / block_size * block_size;
  __syncthreads();
  const int total = block_exclusive_scan(offsets, E, scan_scratch);
  if (threadIdx.x == 0) {
    offsets[E] = total;
    if (num_post_padded) *num_post_padded = total;
  }
  __syncthreads();
}

// Single launch for small inputs (the decode path). Counts and cursors by shared atomics, so the
// first scatter puts each expert's ids in its run of a shared staging array in arbitrary order;
// each id's final place is then its rank among its run (a run holds at most one id per token, so
// at most T entries to compare against), which restores ascending order with no per-warp-round
// work. One scan serves both the padded offsets (high 32 bits) and the unpadded run starts (low).
// Shared: packed [E] int64 | scratch [kWarpSize + 1] int64 | counts [E] | cursor [E] | starts [E] |
// offsets [E] | stage [numel]. One id a thread: the launcher sends at most 1024 ids to a block of
// at least that many threads.
MOE_HOST_DEVICE MOE_FORCEINLINE int align_small_smem_ints(int E, int numel) {
  return 2 * (E + kWarpSize + 1) + 4 * E + numel;
}

__global__ void __launch_bounds__(1024) moe_align_small_kernel(
    const int32_t* __restrict__ ids, int numel, int E, int block_size, const int32_t* __restrict__ expert_map,
    int max_padded, int32_t* __restrict__ sorted, int32_t* __restrict__ expert_ids,
    int32_t* __restrict__ num_post_padded) {
  extern __shared__ __align__(16) int align_smem[];
  long long* packed = reinterpret_cast<long long*>(align_smem);
  long long* scratch = packed + E;
  int* counts = reinterpret_cast<int*>(scratch + kWarpSize + 1);
  int* cursor = counts + E;
  int* starts = cursor + E;
  int* offsets = starts + E;
  int* stage = offsets + E;
  grid_dependents_launch();
  for (int s = threadIdx.x; s < E; s += blockDim.x) counts[s] = cursor[s] = 0;
  grid_dependency_wait();
  for (int i = threadIdx.x; i < max_padded; i += blockDim.x) sorted[i] = numel;  // sentinel
  const int f = threadIdx.x;  // this thread's id
  const int slot = f < numel ? align_slot_device(ids[f], E, expert_map) : -1;
  __syncthreads();
  if (slot >= 0) atomicAdd(&counts[slot], 1);
  __syncthreads();
  for (int s = threadIdx.x; s < E; s += blockDim.x) {
    const int c = counts[s];
    packed[s] = (static_cast<long long>((c + block_size - 1) / block_size * block_size) << 32) | c;
  }
  __syncthreads();
  const long long packed_total = block_exclusive_scan(packed, E, scratch);  // ends with a barrier
  const int total = static_cast<int>(packed_total >> 32);
  for (int s = threadIdx.x; s < E; s += blockDim.x) {
    offsets[s] = static_cast<int>(packed[s] >> 32);
    starts[s] = static_cast<int>(packed[s] & 0xFFFFFFFFll);
  }
  if (threadIdx.x == 0) *num_post_padded = total;
  __syncthreads();
  write_expert_ids(offsets, total, E, block_size, max_padded / block_size, expert_map, expert_ids, threadIdx.x,
                   blockDim.x);
  if (slot >= 0) stage[starts[slot] + atomicAdd(&cursor[slot], 1)] = f;
  __syncthreads();  // the unordered runs are complete
  if (slot >= 0) {
    const int* run = stage + starts[slot];
    const int n = counts[slot];
    int rank = 0;
    for (int q = 0; q < n; ++q) rank += run[q] < f;
    sorted[offsets[slot] + rank] = f;
  }
}

// Single launch for mid sizes (a few thousand ids): one block, ranks from token bit masks.
// Within one row of topk_ids an expert normally appears once, so an id's rank inside its expert's
// run is the number of earlier tokens that chose the expert: each expert keeps a bit mask over
// tokens (words [E, W], W = ceil(T / 32) words, row stride W | 1 against bank conflicts), and the
// rank is the popcount of the words before plus the bits below in the token's own word. A repeated
// expert within a row (user input) is detected by atomicOr's old value; the block then counts ids
// per (expert, word) instead and ranks within a word by scanning that word's ids (at most 32 rows).
// Shared: words [E * Wp] | prefix [E * Wp] | slots [numel] | offsets [E + 1] | scratch [kWarpSize + 1]
// | flag.
constexpr int kTokenWordBits = 32;  // tokens per mask word (a uint32)
MOE_HOST_DEVICE MOE_FORCEINLINE int align_rows_words(int num_tokens) {
  return ((num_tokens + kTokenWordBits - 1) / kTokenWordBits) | 1;
}
MOE_HOST_DEVICE MOE_FORCEINLINE int64_t align_rows_smem_bytes(int E, int num_tokens, int64_t numel) {
  return (2 * int64_t(E) * align_rows_words(num_tokens) + numel + E + 1 + kWarpSize + 2) * 4;
}

__global__ void __launch_bounds__(1024) moe_align_rows_kernel(
    const int32_t* __restrict__ ids,  // [num_tokens, topk] int32
    int num_tokens, int topk, int E, int block_size, const int32_t* __restrict__ expert_map, int max_padded,
    int32_t* __restrict__ sorted, int32_t* __restrict__ expert_ids, int32_t* __restrict__ num_post_padded) {
  extern __shared__ __align__(16) int align_smem[];
  const int Wp = align_rows_words(num_tokens);
  const int numel = num_tokens * topk;
  unsigned* words = reinterpret_cast<unsigned*>(align_smem);
  int* prefix = align_smem + E * Wp;
  int* slots = prefix + E * Wp;
  int* offsets = slots + numel;
  int* scratch = offsets + E + 1;
  int* repeated = scratch + kWarpSize + 1;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  grid_dependents_launch();
  for (int i = tid; i < E * Wp; i += nthreads) words[i] = 0;
  if (tid == 0) *repeated = 0;
  grid_dependency_wait();
  for (int i = tid; i < max_padded; i += nthreads) sorted[i] = numel;  // sentinel; ids overwrite below
  for (int f = tid; f < numel; f += nthreads) slots[f] = align_slot_device(ids[f], E, expert_map);
  __syncthreads();
  for (int f = tid; f < numel; f += nthreads) {
    const int s = slots[f], t = f / topk;
    if (s < 0) continue;
    const unsigned bit = 1u << (t % kTokenWordBits);
    if (atomicOr(&words[s * Wp + t / kTokenWordBits], bit) & bit) *repeated = 1;
  }
  __syncthreads();
  const bool counting = *repeated != 0;  // block-uniform
  if (counting) {  // rare: words become per-(expert, word) id counts
    for (int i = tid; i < E * Wp; i += nthreads) words[i] = 0;
    __syncthreads();
    for (int f = tid; f < numel; f += nthreads)
      if (slots[f] >= 0) atomicAdd(&words[slots[f] * Wp + f / topk / kTokenWordBits], 1u);
    __syncthreads();
  }
  const int W = (num_tokens + kTokenWordBits - 1) / kTokenWordBits;
  for (int s = tid; s < E; s += nthreads) {
    int run = 0;
    for (int w = 0; w < W; ++w) {
      prefix[s * Wp + w] = run;
      run += counting ? static_cast<int>(words[s * Wp + w]) : __popc(words[s * Wp + w]);
    }
    offsets[s] = (run + block_size - 1) / block_size * block_size;
  }
  __syncthreads();
  const int total = block_exclusive_scan(offsets, E, scratch);  // ends with a barrier
  if (tid == 0) *num_post_padded = total;
  for (int f = tid; f < numel; f += nthreads) {
    const int s = slots[f], t = f / topk;
    if (s < 0) continue;
    const int w = t / kTokenWordBits;
    int rank = prefix[s * Wp + w];
    if (!counting) {
      rank += __popc(words[s * Wp + w] & ((1u << (t % kTokenWordBits)) - 1u));
    } else {
      for (int q = w * kTokenWordBits * topk; q < f; ++q) rank += slots[q] == s;
    }
    sorted[offsets[s] + rank] = f;
  }
  write_expert_ids(offsets, total, E, block_size, max_padded / block_size, expert_map, expert_ids, tid, nthreads);
}

// Copies expert_map into shared `map` (E ints) and returns it, or null without a map: the per-id
// slot checks then read shared memory instead of a dependent global load. Callers sync after.
MOE_DEVICE MOE_FORCEINLINE const int32_t* stage_expert_map(const int32_t* __restrict__ expert_map, int E, int* map) {
  if (!expert_map) return nullptr;
  for (int s = threadIdx.x; s < E; s += blockDim.x) map[s] = expert_map[s];
  return map;
}

// The outputs besides the ids, split over a grid of blocks that each hold the same padded offsets
// [E + 1] and per-expert id counts: each expert's blocks in expert_ids and its padding (sentinel
// numel) by one warp, the blocks and the tail past num_tokens_post_padded by grid stride; every
// element written once.
MOE_DEVICE MOE_FORCEINLINE void write_grid_fills(const int* offsets, const int* count, int E, int block_size,
                                                 int max_padded, int numel, const int32_t* __restrict__ expert_map,
                                                 int32_t* __restrict__ expert_ids, int32_t* __restrict__ sorted) {
  const int total = offsets[E];
  const int gtid = blockIdx.x * blockDim.x + threadIdx.x, gstride = gridDim.x * blockDim.x;
  const int warps = blockDim.x / kWarpSize, lane = lane_id();
  for (int s = blockIdx.x * warps + threadIdx.x / kWarpSize; s < E; s += gridDim.x * warps) {
    const int32_t e = expert_map ? expert_map[s] : s;  // an expert with blocks is mapped
    for (int b = offsets[s] / block_size + lane; b < offsets[s + 1] / block_size; b += kWarpSize) expert_ids[b] = e;
    for (int p = offsets[s] + count[s] + lane; p < offsets[s + 1]; p += kWarpSize) sorted[p] = numel;
  }
  for (int b = total / block_size + gtid; b < max_padded / block_size; b += gstride) expert_ids[b] = -1;
  for (int p = total + gtid; p < max_padded; p += gstride) sorted[p] = numel;  // tail
}

// Single launch over a grid for mid sizes (4K to 32K ids), with no workspace: block b owns the chunk
// [b * chunk, (b + 1) * chunk) of the flat ids and scatters only those, so blocks never wait on each
// other. Every block reads all the ids (32 KB at 8192, L2-resident) and counts them by expert, one
// shared atomic per id (an order-free sum), into a table with a row for the ids before its chunk,
// a row per warp for its warp-round of the chunk (chunk = warps * kWarpSize), and a row for the ids
// after it. The launcher sizes blocks to about 32 ids a thread in that count, so a block's fixed work
// (the table, the scan, the fills) is spread over no more warps than it needs. The
// running sum down each expert's column then starts every warp's cursor past the ids of earlier
// chunks and earlier warps, and ends at the expert's total: each block scans the same padded
// totals into the same offsets. The other outputs are split over the grid (write_grid_fills);
// num_tokens_post_padded is block 0's.
// Shared: map [E] | offsets [E + 1] | scratch [kWarpSize + 1] | table [(warps + 2) * E].
constexpr int kAlignVecBatch = 4;  // int4 loads of ids a thread issues before the first use

// Scatter warps (table rows less two) that fit in the static-limit shared memory.
MOE_HOST_DEVICE MOE_FORCEINLINE int align_grid_warps(int E) {
  const int w = (kAlignSmemInts - 2 * E - kWarpSize - 2) / E - 2;
  return w < 1 ? 1 : (w > 1024 / kWarpSize ? 1024 / kWarpSize : w);
}
MOE_HOST_DEVICE MOE_FORCEINLINE int align_grid_smem_ints(int E, int warps) {
  return 2 * E + kWarpSize + 2 + (warps + 2) * E;
}

__global__ void __launch_bounds__(1024, 1) moe_align_grid_kernel(
    const int32_t* __restrict__ ids,  // [numel] int32
    int numel, int chunk, int warps, int E, int block_size, const int32_t* __restrict__ expert_map, int max_padded,
    int32_t* __restrict__ sorted, int32_t* __restrict__ expert_ids, int32_t* __restrict__ num_post_padded) {
  extern __shared__ __align__(16) int align_smem[];
  int* map = align_smem;
  int* offsets = map + E;
  int* scratch = offsets + E + 1;
  int* table = scratch + kWarpSize + 1;  // rows: before the chunk | the warps' segments | after it
  const int tid = threadIdx.x, nthreads = blockDim.x, rows = warps + 2;
  const int c0 = blockIdx.x * chunk, c1 = min(numel, c0 + chunk);  // chunk = warps * kWarpSize: a round each
  // Ids before the first 16-byte boundary (a sliced tensor may start anywhere) are read one by one.
  const int head = min(numel, static_cast<int>((16 - reinterpret_cast<uintptr_t>(ids) % 16) % 16 / 4));
  const int nvec = (numel - head) / 4;
  const int4* vec = reinterpret_cast<const int4*>(ids + head);
  const int step = kAlignVecBatch * nthreads;
  int4 q[kAlignVecBatch];
  grid_dependents_launch();
  grid_dependency_wait();
  auto load = [&](int v0) {
#pragma unroll
    for (int r = 0; r < kAlignVecBatch; ++r)
      if (v0 + r * nthreads + tid < nvec) q[r] = vec[v0 + r * nthreads + tid];
  };
  load(0);  // in flight across the zeroing and the map copy
  for (int i = tid; i < rows * E; i += nthreads) table[i] = 0;
  const int32_t* smap = stage_expert_map(expert_map, E, map);
  __syncthreads();
  auto tally = [&](int f, int32_t id) {
    const int s = align_slot_device(id, E, smap);
    if (s < 0) return;
    const int row = f < c0 ? 0 : (f >= c1 ? rows - 1 : 1 + static_cast<int>(unsigned(f - c0) / kWarpSize));
    atomicAdd(&table[row * E + s], 1);
  };
  for (int v0 = 0; v0 < nvec; v0 += step) {
    if (v0 > 0) load(v0);
#pragma unroll
    for (int r = 0; r < kAlignVecBatch; ++r) {
      const int v = v0 + r * nthreads + tid;
      if (v >= nvec) break;
      const int f = head + 4 * v;
      tally(f, q[r].x);
      tally(f + 1, q[r].y);
      tally(f + 2, q[r].z);
      tally(f + 3, q[r].w);
    }
  }
  for (int f = tid; f < head; f += nthreads) tally(f, ids[f]);
  for (int f = head + 4 * nvec + tid; f < numel; f += nthreads) tally(f, ids[f]);
  __syncthreads();
  int* count = table + (rows - 1) * E;  // the after row, spent once summed: each expert's id count
  for (int s = tid; s < E; s += nthreads) offsets[s] = count[s] = column_exclusive_sum(table, rows, E, s, 0);
  pad_and_scan(offsets, E, block_size, scratch, blockIdx.x == 0 ? num_post_padded : nullptr);  // ends with a barrier
  scatter_segments(ids, c0, c1, warps, E, smap, table + E, offsets, sorted);
  write_grid_fills(offsets, count, E, block_size, max_padded, numel, smap, expert_ids, sorted);
}

// Two launches for more ids than one block takes (the fallback of the single-launch paths):
// 1. moe_align_count_kernel: chunk c's per-expert counts -> the table at align_table_index(s, c, E)
//    (chunk-major: [stride / 4][E][4] ints, stride = chunks rounded up to 4). Every entry below
//    `chunks` is written, so the table needs no memset.
// 2. moe_align_place_kernel: every block sums the table itself (a thread an expert, its counts in
//    16-byte loads, all in flight: each expert's total, and its ids in earlier chunks; B * E ints
//    from L2), scans the padded totals into the offsets, and
//    scatters its own chunk in order (steps 1-3 of the header over the chunk's warps, each warp's
//    cursor starting past the earlier chunks' ids). The other outputs as in the grid kernel.
// Both trigger their dependents at once and wait for the kernel ahead of them before touching global
// memory, so under programmatic dependent launch each one's launch overlaps the kernel before it.

// Shared: counts [E] | map [E].
MOE_HOST_DEVICE MOE_FORCEINLINE int align_table_stride(int chunks) { return (chunks + 3) / 4 * 4; }
// Chunk-major, so the 16-byte vectors a warp's threads (consecutive experts) load at once are 512
// contiguous bytes, as in the cooperative grid's byte table (grid_table_index: expert-major
// rows measured up to 3 us slower there at 128 blocks).
MOE_HOST_DEVICE MOE_FORCEINLINE int align_table_index(int s, int c, int E) { return ((c >> 2) * E + s) * 4 + (c & 3); }

__global__ void __launch_bounds__(1024) moe_align_count_kernel(const int32_t* __restrict__ ids, int numel, int chunk,
                                                               int E, const int32_t* __restrict__ expert_map,
                                                               int32_t* __restrict__ table) {
  extern __shared__ __align__(16) int align_smem[];
  int* counts = align_smem;
  grid_dependents_launch();
  for (int s = threadIdx.x; s < E; s += blockDim.x) counts[s] = 0;
  grid_dependency_wait();
  const int32_t* smap = stage_expert_map(expert_map, E, counts + E);
  __syncthreads();
  const int begin = blockIdx.x * chunk, end = min(numel, begin + chunk);
  for (int f0 = begin; f0 < end; f0 += kAlignVecBatch * blockDim.x) {  // kAlignVecBatch loads in flight
    int32_t id[kAlignVecBatch];
#pragma unroll
    for (int r = 0; r < kAlignVecBatch; ++r) {
      const int f = f0 + r * blockDim.x + threadIdx.x;
      id[r] = f < end ? ids[f] : -1;
    }
#pragma unroll
    for (int r = 0; r < kAlignVecBatch; ++r) {
      const int slot = align_slot_device(id[r], E, smap);
      if (slot >= 0) atomicAdd(&counts[slot], 1);
    }
  }
  __syncthreads();
  for (int s = threadIdx.x; s < E; s += blockDim.x) table[align_table_index(s, blockIdx.x, E)] = counts[s];
}

// Shared: map [E] | totals [E] | base [E] | offsets [E + 1] | scratch [kWarpSize + 1] | counts [warps * E].
MOE_HOST_DEVICE MOE_FORCEINLINE int align_place_smem_ints(int E, int warps) {
  return 4 * E + kWarpSize + 2 + warps * E;
}
constexpr int kPlaceRowVecs = 8;  // table vectors (32 chunks) a place thread loads ahead of the count

// Warps of a place block: as many as the per-warp count table leaves room for, at most 16 (512
// threads: registers for the table row loaded ahead).
constexpr int kPlaceMaxThreads = 512;
MOE_HOST_DEVICE MOE_FORCEINLINE int align_place_warps(int E) {
  const int w = (kAlignSmemInts - 4 * E - kWarpSize - 2) / E;
  return w < 1 ? 1 : (w > kPlaceMaxThreads / kWarpSize ? kPlaceMaxThreads / kWarpSize : w);
}

__global__ void __launch_bounds__(kPlaceMaxThreads) moe_align_place_kernel(
    const int32_t* __restrict__ ids, int numel, int chunk, int E, int block_size,
    const int32_t* __restrict__ expert_map, int max_padded,
    const int32_t* __restrict__ table,  // chunk counts from moe_align_count_kernel (align_table_index)
    int32_t* __restrict__ sorted, int32_t* __restrict__ expert_ids, int32_t* __restrict__ num_post_padded) {
  extern __shared__ __align__(16) int align_smem[];
  int* map = align_smem;
  int* totals = map + E;
  int* base = totals + E;
  int* offsets = base + E;
  int* scratch = offsets + E + 1;
  int* counts = scratch + kWarpSize + 1;
  const int tid = threadIdx.x, nthreads = blockDim.x, warps = nthreads / kWarpSize;
  const int chunks = gridDim.x, b = blockIdx.x;
  grid_dependents_launch();
  for (int i = tid; i < warps * E; i += nthreads) counts[i] = 0;
  grid_dependency_wait();
  const int32_t* smap = stage_expert_map(expert_map, E, map);
  __syncthreads();
  // Expert s's counts in the table: its total, and its ids in chunks before this one. The first
  // kPlaceRowVecs vectors of this thread's first expert are loaded before the chunk's ids are
  // counted, so the two round trips to L2 overlap.
  const int nvec = align_table_stride(chunks) / 4;
  const int4* vecs = reinterpret_cast<const int4*>(table);  // expert s's chunks 4q..4q+3: vecs[q * E + s]
  int4 head[kPlaceRowVecs];
#pragma unroll
  for (int q = 0; q < kPlaceRowVecs; ++q)
    if (tid < E && q < nvec) head[q] = vecs[q * E + tid];
  const int c0 = b * chunk, c1 = min(numel, c0 + chunk);
  count_segments(ids, c0, c1, E, smap, counts);
  for (int s = tid; s < E; s += nthreads) {
    int total = 0, before = 0;
    auto add = [&](const int4 v, int q) {
      const int c = 4 * q, x[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        total += c + k < chunks ? x[k] : 0;  // past `chunks`: never written
        before += c + k < b ? x[k] : 0;
      }
    };
    if (s == tid) {  // the first row: its head is in registers
#pragma unroll
      for (int q = 0; q < kPlaceRowVecs; ++q)
        if (q < nvec) add(head[q], q);
    } else {
#pragma unroll
      for (int q = 0; q < kPlaceRowVecs; ++q)
        if (q < nvec) add(vecs[q * E + s], q);
    }
    for (int q = kPlaceRowVecs; q < nvec; ++q) add(vecs[q * E + s], q);
    totals[s] = total;
    base[s] = before;
  }
  __syncthreads();
  for (int s = tid; s < E; s += nthreads) offsets[s] = totals[s];  // padded and scanned in place:
  pad_and_scan(offsets, E, block_size, scratch, b == 0 ? num_post_padded : nullptr);  // ends with a barrier
  for (int s = tid; s < E; s += nthreads) base[s] += offsets[s];
  __syncthreads();
  counts_to_cursors(counts, E, base);
  __syncthreads();
  scatter_segments(ids, c0, c1, warps, E, smap, counts, nullptr, sorted);
  write_grid_fills(offsets, totals, E, block_size, max_padded, numel, smap, expert_ids, sorted);
}

// ---- The cooperative grid (moe_align_coop_kernel here, fused_gating_align_grid_kernel in
// fused_routing.cuh): blocks of at most kWarpSize tokens, a warp a token, every block resident at once.
// A block knows each of its ids' rank inside its own run of the id's expert, and each expert's count
// in the block (at most 255); it writes the counts into its column of a byte table, and after one
// grid barrier every block sums the table (each expert's total, and its ids in earlier blocks), scans
// the padded totals, and writes its ids at offset + before + rank. No block counts another's ids.

// Rows of a run of c ids padded to whole blocks: block_size is 1 << block_shift when block_shift >= 0.
MOE_DEVICE MOE_FORCEINLINE int pad_to_blocks(int c, int block_size, int block_shift) {
  return block_shift >= 0 ? ((c + block_size - 1) >> block_shift) << block_shift
                          : (c + block_size - 1) / block_size * block_size;
}
MOE_DEVICE MOE_FORCEINLINE int blocks_of(int rows, int block_size, int block_shift) {
  return block_shift >= 0 ? rows >> block_shift : rows / block_size;
}

MOE_HOST_DEVICE MOE_FORCEINLINE int grid_table_stride(int blocks) { return (blocks + 15) / 16 * 16; }
// The count of expert e in block c: the table is chunk-major, [stride / 16][E][16] bytes, so the
// vectors of 16 blocks' counts that a warp's threads (consecutive experts) load at once are 512
// contiguous bytes. Row-major ([E][stride], a thread's vectors its own row) measured 0.3-3 us slower
// at 64-128 blocks (H200, results/h200-fused-grid-s12a.md: fused T=1024 E=256 top-8 8 tokens a block
// 7.90 against 11.12 us): every block reads the whole table, and each warp load touched 32 sectors
// instead of 16 and 16 lines instead of 4. Four copies of the table (block b reading copy b % 4,
// against hot L2 lines) measured slower in both layouts.
MOE_HOST_DEVICE MOE_FORCEINLINE int grid_table_index(int e, int c, int E) { return ((c >> 4) * E + e) * 16 + (c & 15); }
constexpr int kGridRowBatch = 4;  // table vectors (64 blocks' counts) a thread loads at once
// Programmatic dependent launch: a grid of at most this many blocks lets the kernel behind it launch
// at once, a larger one once past the grid barrier, as the router does (topk_gating_kernel). H200,
// fused T = 1024, E = 256 top-8, 64 blocks, calls back to back: an early trigger 9.4 us a call, none
// 8.9, after the barrier 8.3-8.5.
constexpr int kGridEarlyTriggerBlocks = 32;

// Bytes of chunks [c, c + 4) of a table word that are below `limit` (0..4 of them, low first).
MOE_DEVICE MOE_FORCEINLINE uint32_t bytes_below(int c, int limit) {
  const int n = limit - c;
  return n >= 4 ? 0xffffffffu : (n <= 0 ? 0u : (1u << (8 * n)) - 1u);
}

// Everything after the per-block counts, for both cooperative kernels. Thread e < E holds `count`, its
// expert's ids in this block (<= 255); a thread with an id holds its `slot` (-1: none) and its flat
// index `flat`, and rank() gives its rank in the block's run of that slot (called last, so what it
// reads need not live across the barrier). base: [E] ints, warp_total: [kWarpSize] ints of shared
// memory. Every thread of every block must call it (grid barrier inside).
template <typename RankFn>
MOE_DEVICE MOE_FORCEINLINE void grid_place(uint8_t* __restrict__ table, int count, int slot, RankFn rank, int flat,
                                           int E, int block_size, int block_shift,
                                           const int32_t* __restrict__ expert_map, int max_padded, int* base,
                                           int* warp_total, int32_t* __restrict__ sorted,
                                           int32_t* __restrict__ expert_ids, int32_t* __restrict__ num_post_padded) {
  const int tid = threadIdx.x, b = blockIdx.x, nb = gridDim.x;
  if (tid < E) table[grid_table_index(tid, b, E)] = static_cast<uint8_t>(count);
  grid_sync();
  if (nb > kGridEarlyTriggerBlocks) grid_dependents_launch();

  int total = 0, before = 0;  // expert tid's ids in the grid, and in blocks before b
  if (tid < E) {
    const uint4* vec = reinterpret_cast<const uint4*>(table) + tid;  // expert tid's counts of blocks 0-15
    const int nvec = grid_table_stride(nb) / 16;
    for (int q0 = 0; q0 < nvec; q0 += kGridRowBatch) {  // kGridRowBatch loads in flight
      uint4 v[kGridRowBatch];
#pragma unroll
      for (int q = 0; q < kGridRowBatch; ++q)
        if (q0 + q < nvec) v[q] = vec[(q0 + q) * E];
#pragma unroll
      for (int q = 0; q < kGridRowBatch; ++q) {
        if (q0 + q >= nvec) break;
        const uint32_t x[4] = {v[q].x, v[q].y, v[q].z, v[q].w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int c = 16 * (q0 + q) + 4 * k;
          total = add_bytes(x[k] & bytes_below(c, nb), total);  // past nb: never written
          before = add_bytes(x[k] & bytes_below(c, b), before);
        }
      }
    }
  }
  const int padded = pad_to_blocks(total, block_size, block_shift);
  int all;
  const int offset = block_scan_one(padded, warp_total, all);  // ends past a barrier
  if (tid < E) base[tid] = offset + before;
  if (b == 0 && tid == 0) *num_post_padded = all;
  if (tid < E && tid % nb == b && padded > 0) {  // expert tid's blocks, from one block of the grid
    const int32_t e = expert_map ? expert_map[tid] : tid;
    const int b0 = blocks_of(offset, block_size, block_shift), b1 = blocks_of(offset + padded, block_size, block_shift);
    for (int x = b0; x < b1; ++x) expert_ids[x] = e;
  }
  for (int x = blocks_of(all, block_size, block_shift) + b * blockDim.x + tid;
       x < blocks_of(max_padded, block_size, block_shift); x += nb * blockDim.x)
    expert_ids[x] = -1;
  __syncthreads();  // base ready
  if (slot >= 0) sorted[base[slot] + rank()] = flat;
}

// The alignment alone over the cooperative grid: block b holds tokens [b * tokens_per_block, ...), warp w
// token w of them, lane j < topk its j-th id (topk <= kWarpSize). A token that names an expert once
// (what a router gives) is ranked by token bit masks, as in the fused kernels: an expert's count is its
// mask's popcount, an id's rank the popcount below its token's bit. A block in which some token repeats
// an expert (a caller's ids may) ranks instead by a thread an expert walking the block's ids in order
// (at most 255). The launcher keeps tokens_per_block * topk <= 255, so a block's count fits a byte.
// Shared: masks [E] lane masks | base [E] ints | warp_total [kWarpSize] ints | slots [tokens_per_block *
// topk] ints | ranks [the same].
MOE_HOST_DEVICE MOE_FORCEINLINE int align_coop_smem_bytes(int E, int tokens_per_block, int topk) {
  return E * int(sizeof(moe_lane_mask_t)) + (E + kWarpSize + 2 * tokens_per_block * topk) * 4;
}
constexpr int kAlignCoopMaxBlockIds = 255;

__global__ void __launch_bounds__(1024) moe_align_coop_kernel(
    const int32_t* __restrict__ ids,          // [num_tokens, topk]
    int num_tokens, int topk, int tokens_per_block, int E,
    int block_size, int block_shift,          // block_shift = log2(block_size), or -1 if not a power of two
    const int32_t* __restrict__ expert_map,   // [E] int32 or null
    int max_padded,
    uint8_t* __restrict__ table,              // E x grid_table_stride(gridDim.x) bytes, workspace
    int32_t* __restrict__ sorted,             // [max_padded] int32
    int32_t* __restrict__ expert_ids,         // [max_padded / block_size] int32
    int32_t* __restrict__ num_post_padded) {  // [1] int32
  extern __shared__ __align__(16) char coop_smem[];
  moe_lane_mask_t* masks = reinterpret_cast<moe_lane_mask_t*>(coop_smem);
  int* base = reinterpret_cast<int*>(masks + E);
  int* warp_total = base + E;
  int* slots = warp_total + kWarpSize;
  int* ranks = slots + tokens_per_block * topk;
  const int b = blockIdx.x, tid = threadIdx.x, warp = tid / kWarpSize, lane = lane_id();
  const int numel = num_tokens * topk, t = b * tokens_per_block + warp;
  const int tokens = min(tokens_per_block, num_tokens - b * tokens_per_block);

  if (gridDim.x <= kGridEarlyTriggerBlocks) grid_dependents_launch();
  if (tid < E) masks[tid] = 0;
  grid_dependency_wait();
  for (int i = b * blockDim.x + tid; i < max_padded; i += gridDim.x * blockDim.x) sorted[i] = numel;  // sentinel
  const bool holds = warp < tokens && lane < topk;
  const int slot = holds ? align_slot_device(ids[int64_t(t) * topk + lane], E, expert_map) : -1;
  const moe_lane_mask_t peers = match_any<kAlignMatchBits>(slot);  // a token's lanes naming the same slot
  __syncthreads();  // masks zeroed
  if (slot >= 0) atomicOr(&masks[slot], lane_bit(warp));
  const bool repeats = __syncthreads_or(slot >= 0 && popcount(peers) > 1);  // masks complete

  int count = 0, rank = 0;
  if (!repeats) {
    if (tid < E) count = popcount(masks[tid]);
    if (slot >= 0) rank = popcount(masks[slot] & (lane_bit(warp) - 1));
  } else {  // block-uniform; only this path stages the slots
    if (warp < tokens_per_block && lane < topk) slots[warp * topk + lane] = slot;
    __syncthreads();
    if (tid < E)
      for (int i = 0; i < tokens * topk; ++i)
        if (slots[i] == tid) ranks[i] = count++;
    __syncthreads();
    if (slot >= 0) rank = ranks[warp * topk + lane];
  }
  grid_place(table, count, slot, [rank] { return rank; }, t * topk + lane, E, block_size, block_shift, expert_map,
             max_padded, base, warp_total, sorted, expert_ids, num_post_padded);
}

}  // namespace moe_ext
