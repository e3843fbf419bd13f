// Grouped expert GEMM with gather and scatter: out[id] = a[id / topk] @ w[e]^T (* topk_weights[id])
// for every id of an alignment block of expert e (moe_align_block_size's layout).
//
// Grid: x = m-tiles (each alignment block split into ceil(block_size / BM) tiles of BM rows, so any
// block size works with any BM; rows past the block are masked), y = N-tiles of BN columns. A CTA
// reads its block's expert and row ids once; tiles past num_tokens_post_padded (read on the device),
// of an expert outside [0, E), or holding no valid id exit before touching a or w.
//
// Tensor-core path (bf16/fp16, sm_80+): a STAGES-deep cp.async pipeline streams the gathered A rows
// [BM, BK] and the weight tile [BN, BK] (w[e] is [N, K] row-major, which is the "col" B operand of
// mma.m16n8k16 as stored) into shared memory padded by 8 elements a row (a row stride of an odd
// number of 16-byte units: the 8 rows one ldmatrix phase reads, or one store phase writes, fall in
// distinct bank groups). Warps tile the CTA as WARPS_M x WARPS_N,
// each computing WM x WN with fp32 accumulators. Out-of-range rows, columns and K are zero-filled
// (cp.async src-size 0) so they add nothing. When K % 8 != 0 (or a base is not 16-byte aligned)
// rows are not 16-byte aligned: the same pipeline then loads with guarded scalar reads.
// SIMT path (fp32, and any target without mma): shared-memory tiles, fp32 FMA, same row logic.
// Hopper (sm_90a) prefill tiles on warpgroup MMA: grouped_gemm_wgmma.cuh, same params and rows.
//
// Epilogue: fp32 accumulator times the routed weight, one rounding to T, scattered to row id.
// Rows never written (blocks of expert -1, ids the alignment dropped) are zeroed by the caller:
// either the output starts zeroed, or `covered` flags (set here by the N-tile-0 CTAs) drive
// zero_uncovered_rows_kernel afterwards.
//
// SiLU-and-mul variant (MmaConfig's kSiluMul; moe_grouped_gemm_silu): w is w13 [E, 2N, K] and the
// output [rows, N] (N = I). A CTA's N-tile [n0, n0 + BN) loads 2*BN weight rows a stage, gate rows
// n0.. and up rows N + n0.., into one [2*BN, BK] B tile, keeps two accumulator sets, and stores
// silu(gate) * up computed from the fp32 accumulators (one rounding; no routed weight).
#pragma once

#include <cstdint>
#include <type_traits>

#include "activation.cuh"
#include "vec.cuh"

#if !defined(__HIP_PLATFORM_AMD__)
#define MOE_GG_HAS_MMA 1
#else
#define MOE_GG_HAS_MMA 0
#endif

// The tensor-core tiles' launch bounds' second value (minimum CTAs a multiprocessor). 0 = none given, the
// default and what every table entry was tuned with. ptxas allocates registers differently with 1 (the
// decode GEMVs, session 27: given none, they took fewer registers and made the layer 3-22% slower); a
// build with NVCC_APPEND_FLAGS=-DMOE_EXT_GEMM_MIN_BLOCKS=1 is that A/B for these tiles (bench/NOTES.md).
#ifndef MOE_EXT_GEMM_MIN_BLOCKS
#define MOE_EXT_GEMM_MIN_BLOCKS 0
#endif

namespace moe_ext {

struct GroupedGemmParams {
  const void* a;                 // [M, K]
  const void* w;                 // [E, N, K] ([E, 2N, K] for the SiLU-and-mul variant)
  const int32_t* sorted_ids;     // [num_blocks * block_size]
  const int32_t* expert_ids;     // [num_blocks]
  const int32_t* num_post_padded;  // [1]
  const float* topk_weights;     // [rows] or null
  void* out;                     // [rows, N]
  uint8_t* covered;              // [rows] zeroed by the caller, or null
  int rows;                      // M * topk
  int topk;
  int N;
  int K;
  int num_experts;
  int block_size;
  int tiles_per_block;           // ceil(block_size / BM)
};

namespace gg {

MOE_HOST_DEVICE constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Fills s_id (output row, or -1) and s_tok (row of a, or -1) for the BM rows of m-tile `mtile` and
// returns the CTA's expert, or -1 when the tile has nothing to do (uniform across the CTA). The
// CTAs of N-tile 0 set the covered flags.
template <int BM>
MOE_DEVICE MOE_FORCEINLINE int setup_tile_rows(const GroupedGemmParams& p, int mtile, int ntile, int* s_id,
                                               int* s_tok) {
  const int blk = mtile / p.tiles_per_block;
  const int row0 = (mtile % p.tiles_per_block) * BM;  // first row within the block
  const int64_t slot0 = int64_t(blk) * p.block_size + row0;
  const int64_t valid_slots = *p.num_post_padded;
  if (slot0 >= valid_slots) return -1;
  const int e = p.expert_ids[blk];
  if (e < 0 || e >= p.num_experts) return -1;
  int any = 0;
  for (int r = threadIdx.x; r < BM; r += blockDim.x) {
    int id = -1;
    if (row0 + r < p.block_size && slot0 + r < valid_slots) {
      id = p.sorted_ids[slot0 + r];
      if (id < 0 || id >= p.rows) id = -1;
    }
    s_id[r] = id;
    s_tok[r] = id >= 0 ? id / p.topk : -1;
    if (id >= 0) {
      any = 1;
      if (p.covered != nullptr && ntile == 0) p.covered[id] = 1;
    }
  }
  return __syncthreads_or(any) ? e : -1;
}

// The routed weight of output row id (1 without weights or for a skipped row).
MOE_DEVICE MOE_FORCEINLINE float row_scale(const GroupedGemmParams& p, int id) {
  return (p.topk_weights != nullptr && id >= 0) ? p.topk_weights[id] : 1.0f;
}

#if MOE_GG_HAS_MMA
template <typename T>
MOE_DEVICE MOE_FORCEINLINE void store2(T* p, float x, float y);
template <>
MOE_DEVICE MOE_FORCEINLINE void store2<__nv_bfloat16>(__nv_bfloat16* p, float x, float y) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(x, y);
}
template <>
MOE_DEVICE MOE_FORCEINLINE void store2<__half>(__half* p, float x, float y) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(x, y);
}

// Writes columns col and col + 1 (each only if < N) of output row id (skipped when -1), times s.
template <typename T>
MOE_DEVICE MOE_FORCEINLINE void store_pair(const GroupedGemmParams& p, int id, float s, int col, float x, float y,
                                           bool paired) {
  if (id < 0 || col >= p.N) return;
  T* o = static_cast<T*>(p.out) + int64_t(id) * p.N + col;
  if (paired) {  // N even: col even, so col + 1 < N and the pair is 4-byte aligned
    store2<T>(o, x * s, y * s);
  } else {
    o[0] = from_float<T>(x * s);
    if (col + 1 < p.N) o[1] = from_float<T>(y * s);
  }
}

// Stores an accumulator quad: q[0], q[1] at row id_lo, columns col and col + 1; q[2], q[3] at row
// id_hi; each row times its routed weight. q is the gate quad; with kSiluMul, silu(gate) * up.
template <typename T, bool kSiluMul>
MOE_DEVICE MOE_FORCEINLINE void store_quad(const GroupedGemmParams& p, const float* gate, const float* up, int id_lo,
                                           float s_lo, int id_hi, float s_hi, int col, bool paired) {
  float v[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) v[q] = kSiluMul ? silu_mul(gate[q], up[q]) : gate[q];
  store_pair<T>(p, id_lo, s_lo, col, v[0], v[1], paired);
  store_pair<T>(p, id_hi, s_hi, col, v[2], v[3], paired);
}

MOE_DEVICE MOE_FORCEINLINE uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes 0 writes zeros and reads nothing.
MOE_DEVICE MOE_FORCEINLINE void cp_async16(void* dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
#endif
}
MOE_DEVICE MOE_FORCEINLINE void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int kPending>
MOE_DEVICE MOE_FORCEINLINE void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// Four 8x8 b16 matrices; lane l gives the row address of matrix l / 8.
MOE_DEVICE MOE_FORCEINLINE void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
#endif
}

template <typename T>
MOE_DEVICE MOE_FORCEINLINE void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// kSiluMul: BN output columns from 2 * BN weight rows (gate and up) a stage, two accumulator sets.
template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_, bool kSiluMul_ = false>
struct MmaConfig {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static constexpr bool kSiluMul = kSiluMul_;
  static constexpr int kSets = kSiluMul ? 2 : 1;  // accumulator sets (gate, up)
  static constexpr int kBRows = kSets * BN;       // weight rows of a stage's B tile
  static constexpr int kThreads = WARPS_M * WARPS_N * kWarpSize;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MI = WM / 16, NI = WN / 8;  // m16n8 tiles per warp
  static constexpr int LDS = BK + 8;                // padded smem row, elements
  static constexpr int kChunksPerRow = BK / 8;      // 16-byte chunks of a tile row
  static constexpr int kAChunks = BM * kChunksPerRow, kBChunks = kBRows * kChunksPerRow;
  static constexpr int kAIters = ceil_div(kAChunks, kThreads), kBIters = ceil_div(kBChunks, kThreads);
  static constexpr int kStageElems = (BM + kBRows) * LDS;
  template <typename T>
  static constexpr int smem_bytes() { return STAGES * kStageElems * static_cast<int>(sizeof(T)); }
  static_assert(kWarpSize == 32, "the mma.sync fragment layouts assume 32-lane warps");
  static_assert(WM % 16 == 0 && WN % 16 == 0 && BK % 16 == 0 && STAGES >= 2, "bad tile shape");
};

// One 16-byte chunk of a tile row: cp.async (zero-filled out of range) when kAligned, else guarded
// scalar loads (a row of K % 8 != 0 elements is not 16-byte aligned).
// `base` is any valid global address, the source operand of a zero-fill copy (which reads nothing).
template <typename T, bool kAligned>
MOE_DEVICE MOE_FORCEINLINE void load_chunk(T* dst, const T* row, int k, int K, const T* base) {
  if constexpr (kAligned) {
    const bool ok = row != nullptr && k < K;  // K % 8 == 0: the whole chunk is in range
    cp_async16(dst, ok ? row + k : base, ok ? 16 : 0);
  } else {
    Vec<T> v;
#pragma unroll
    for (int j = 0; j < Vec<T>::kSize; ++j) v.v[j] = (row != nullptr && k + j < K) ? row[k + j] : from_float<T>(0.0f);
    store_vec(dst, v);
  }
}
#endif  // MOE_GG_HAS_MMA

}  // namespace gg

#if MOE_GG_HAS_MMA
// Tensor-core grouped GEMM; Cfg is a gg::MmaConfig, T bf16 or fp16. Dynamic smem: Cfg::smem_bytes<T>().
template <typename T, typename Cfg, bool kAligned>
__global__ void __launch_bounds__(Cfg::kThreads, MOE_EXT_GEMM_MIN_BLOCKS) grouped_gemm_mma_kernel(const GroupedGemmParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, LDS = Cfg::LDS, STAGES = Cfg::STAGES;
  constexpr int NT = Cfg::kThreads, CPR = Cfg::kChunksPerRow;
  extern __shared__ __align__(128) unsigned char gg_smem[];
  __shared__ int s_id[BM], s_tok[BM];

  const int e = gg::setup_tile_rows<BM>(p, blockIdx.x, blockIdx.y, s_id, s_tok);
  if (e < 0) return;
  const int tid = threadIdx.x;
  const int n0 = blockIdx.y * BN;
  const int K = p.K;
  const T* a = static_cast<const T*>(p.a);
  const T* w = static_cast<const T*>(p.w) + int64_t(e) * Cfg::kSets * p.N * K;

  // Each thread copies the same tile rows every k-step: resolve their source rows once.
  const T* a_row[Cfg::kAIters];
  const T* b_row[Cfg::kBIters];
#pragma unroll
  for (int i = 0; i < Cfg::kAIters; ++i) {
    const int c = tid + i * NT;
    const int tok = c < Cfg::kAChunks ? s_tok[c / CPR] : -1;
    a_row[i] = tok >= 0 ? a + int64_t(tok) * K : nullptr;
  }
#pragma unroll
  for (int i = 0; i < Cfg::kBIters; ++i) {  // B tile row r: set r / BN (gate, up), column n0 + r % BN
    const int c = tid + i * NT;
    const int r = c / CPR, n = n0 + r % BN;
    b_row[i] = (c < Cfg::kBChunks && n < p.N) ? w + (int64_t(r / BN) * p.N + n) * K : nullptr;
  }

  T* smem = reinterpret_cast<T*>(gg_smem);
  auto load_stage = [&](int stage, int k0) {
    T* sA = smem + stage * Cfg::kStageElems;
    T* sB = sA + BM * LDS;
#pragma unroll
    for (int i = 0; i < Cfg::kAIters; ++i) {
      const int c = tid + i * NT;
      if (Cfg::kAChunks % NT == 0 || c < Cfg::kAChunks)
        gg::load_chunk<T, kAligned>(sA + (c / CPR) * LDS + (c % CPR) * 8, a_row[i], k0 + (c % CPR) * 8, K, a);
    }
#pragma unroll
    for (int i = 0; i < Cfg::kBIters; ++i) {
      const int c = tid + i * NT;
      if (Cfg::kBChunks % NT == 0 || c < Cfg::kBChunks)
        gg::load_chunk<T, kAligned>(sB + (c / CPR) * LDS + (c % CPR) * 8, b_row[i], k0 + (c % CPR) * 8, K, w);
    }
  };

  const int lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int wm = (warp / Cfg::WARPS_N) * Cfg::WM, wn = (warp % Cfg::WARPS_N) * Cfg::WN;
  float acc[Cfg::kSets][Cfg::MI][Cfg::NI][4] = {};

  const int k_tiles = gg::ceil_div(K, BK);
  // Prologue: STAGES - 1 tiles in flight. Every iteration commits one group (empty past the end),
  // so "tile kt has landed" is always "at most STAGES - 2 groups pending".
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) load_stage(s, s * BK);
    gg::cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    gg::cp_async_wait<STAGES - 2>();
    // Tile kt visible to all; and every warp is done with stage (kt - 1) % STAGES, refilled below.
    __syncthreads();
    const int next = kt + STAGES - 1;
    if (next < k_tiles) load_stage(next % STAGES, next * BK);
    gg::cp_async_commit();

    const T* sA = smem + (kt % STAGES) * Cfg::kStageElems;
    const T* sB = sA + BM * LDS;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t af[Cfg::MI][4], bf[Cfg::NI][2];
#pragma unroll
      for (int mi = 0; mi < Cfg::MI; ++mi)  // matrices: rows 0-7 / 8-15 x k 0-7 / 8-15 -> a0..a3
        gg::ldmatrix_x4(af[mi], sA + (wm + mi * 16 + lane % 16) * LDS + kk + (lane / 16) * 8);
#pragma unroll
      for (int set = 0; set < Cfg::kSets; ++set) {  // the up set's rows follow the gate set's in sB
#pragma unroll
        for (int nj = 0; nj < Cfg::NI / 2; ++nj) {  // matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, ...)
          uint32_t r[4];
          gg::ldmatrix_x4(r, sB + (set * BN + wn + nj * 16 + (lane / 16) * 8 + lane % 8) * LDS + kk +
                                 ((lane / 8) % 2) * 8);
          bf[2 * nj][0] = r[0];
          bf[2 * nj][1] = r[1];
          bf[2 * nj + 1][0] = r[2];
          bf[2 * nj + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
          for (int ni = 0; ni < Cfg::NI; ++ni) gg::mma_16816<T>(acc[set][mi][ni], af[mi], bf[ni][0], bf[ni][1]);
      }
    }
  }
  gg::cp_async_wait<0>();  // no copy may outlive the CTA (only empty groups remain here)

  // Accumulator c0,c1: (row lane/4, cols 2*(lane%4) + 0,1); c2,c3: the same 8 rows below.
  const bool paired = p.N % 2 == 0;
#pragma unroll
  for (int mi = 0; mi < Cfg::MI; ++mi) {
    const int r = wm + mi * 16 + lane / 4;
    const int id_lo = s_id[r], id_hi = s_id[r + 8];
    const float s_lo = gg::row_scale(p, id_lo), s_hi = gg::row_scale(p, id_hi);
#pragma unroll
    for (int ni = 0; ni < Cfg::NI; ++ni) {
      const int col = n0 + wn + ni * 8 + (lane % 4) * 2;
      gg::store_quad<T, Cfg::kSiluMul>(p, acc[0][mi][ni], acc[Cfg::kSets - 1][mi][ni], id_lo, s_lo, id_hi, s_hi, col,
                                       paired);
    }
  }
#endif
}
#endif  // MOE_GG_HAS_MMA

// SIMT fallback for any element type and target: 32 x 64 tiles, k-steps of 16, 256 threads each
// computing 2 rows x 4 columns (columns 16 apart so the shared reads are conflict-free).
namespace gg {
constexpr int kSimtBM = 32, kSimtBN = 64, kSimtBK = 16, kSimtThreads = 256;
}

template <typename T>
__global__ void __launch_bounds__(gg::kSimtThreads) grouped_gemm_simt_kernel(const GroupedGemmParams p) {
  constexpr int BM = gg::kSimtBM, BN = gg::kSimtBN, BK = gg::kSimtBK, NT = gg::kSimtThreads;
  __shared__ int s_id[BM], s_tok[BM];
  __shared__ float sA[BK][BM + 1], sB[BK][BN + 1];
  const int e = gg::setup_tile_rows<BM>(p, blockIdx.x, blockIdx.y, s_id, s_tok);
  if (e < 0) return;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int n0 = blockIdx.y * BN;
  const int K = p.K;
  const T* a = static_cast<const T*>(p.a);
  const T* w = static_cast<const T*>(p.w) + int64_t(e) * p.N * K;
  float acc[2][4] = {};
  for (int k0 = 0; k0 < K; k0 += BK) {
    for (int i = tid; i < BM * BK; i += NT) {
      const int r = i / BK, k = k0 + i % BK, tok = s_tok[r];
      sA[i % BK][r] = (tok >= 0 && k < K) ? to_float(a[int64_t(tok) * K + k]) : 0.0f;
    }
    for (int i = tid; i < BN * BK; i += NT) {
      const int n = n0 + i / BK, k = k0 + i % BK;
      sB[i % BK][i / BK] = (n < p.N && k < K) ? to_float(w[int64_t(n) * K + k]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk)
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += sA[kk][ty * 2 + i] * sB[kk][tx + 16 * j];
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int id = s_id[ty * 2 + i];
    if (id < 0) continue;
    const float s = gg::row_scale(p, id);
    T* o = static_cast<T*>(p.out) + int64_t(id) * p.N;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = n0 + tx + 16 * j;
      if (n < p.N) o[n] = from_float<T>(acc[i][j] * s);
    }
  }
}

// Zeroes the output rows whose covered flag is 0: one warp per row, 16-byte stores when kVec.
template <typename T, bool kVec>
__global__ void zero_uncovered_rows_kernel(const uint8_t* __restrict__ covered, T* __restrict__ out, int64_t rows,
                                           int64_t n) {
  constexpr int kW = kVec ? Vec<T>::kSize : 1;
  const int warps = blockDim.x / kWarpSize;
  const int64_t per_row = n / kW;
  for (int64_t r = int64_t(blockIdx.x) * warps + threadIdx.x / kWarpSize; r < rows; r += int64_t(gridDim.x) * warps) {
    if (covered[r]) continue;
    T* o = out + r * n;
    for (int64_t c = lane_id(); c < per_row; c += kWarpSize) {
      if constexpr (kVec) {
        *reinterpret_cast<uint4*>(o + c * kW) = make_uint4(0, 0, 0, 0);  // all-zero bits: +0 in every T
      } else {
        o[c] = from_float<T>(0.0f);
      }
    }
  }
}

}  // namespace moe_ext
