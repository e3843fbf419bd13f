// Launcher of the grouped expert GEMM and of its SiLU-and-mul variant: the config tables, the shape
// heuristics over them, and the zeroing of rows no valid block writes.
#include <algorithm>
#include <climits>

#include "../kernels/grouped_gemm.cuh"
#include "../kernels/grouped_gemm_wgmma.cuh"
#include "dispatch.cuh"
#include "grouped_gemm.h"
#include "grouped_gemm_table.h"

namespace moe_ext::cuda {
namespace {

int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

#if MOE_GG_HAS_MMA
using gg::MmaConfig;

// The tensor-core configs. Index = `config` (MOE_EXT_GROUPED_GEMM_CONFIG forces one; the tuner
// bench/tune_grouped_gemm.py times them all). Shared memory is for 16-bit types, 8 elements of
// padding a row:
//  idx  BM   BN   BK  warps  stages  smem bytes  meant for
//   0   16   64  128   1x4     4      87,040     decode with few N-tiles x blocks (more CTAs)
//   1   16  128   64   1x4     4      82,944     decode
//   2   32  128   64   1x4     4      92,160     block_size 32
//   3   64  128   64   2x2     4     110,592     block_size 64 (prefill)
//   4   64   64   64   2x2     4      73,728     block_size 64, few CTAs
//   5  128  128   32   2x4     4      81,920     block_size 128
//   6  128  128   64   2x4     3     110,592     block_size 128 (prefill)
//   7   64  128   32   2x2     4      61,440     block_size 64, three CTAs a multiprocessor
//   8   64  128   64   2x4     4     110,592     block_size 64, 8 warps (fewer registers each)
//   9  128  128   64   2x2     3     110,592     block_size 128, 4 warps of 64 x 64
//  10   32   64  128   1x4     4     104,448     block_size 32, few CTAs
//  11   16   32  128   1x2     4      52,224     decode with few CTAs: 2 warps, up to 4 CTAs a multiprocessor
// Hopper wgmma configs (grouped_gemm_wgmma.cuh; BK 64, unpadded swizzled rows; warpgroups, not warps):
//  12  128  128   64   2x1     5     164,864     block_size 128 (prefill), fewer CTAs
//  13  128  256   64   2x1     4     197,632     block_size 128 (prefill)
//  14   64  256   64   1x2     4     164,864     block_size 64 (prefill)
// The same tiles with the weight tile copied by one thread's TMA (grouped_gemm_wgmma.cuh's kTma):
//  15  128  256   64   2x1     4     197,632     13 by TMA: block_size 128 (prefill)
//  16   64  256   64   1x2     4     164,864     14 by TMA: block_size 64
//  17  192  256   64   3x1     4     230,400     by TMA, three warpgroups: block_size 192 (a third less weight
//                                                traffic a row than 15 where an expert fills the tile)
//  18   64  128   64   1x1     4      99,328     by TMA, one warpgroup: block_size 64 where 16's grid would leave
//                                                multiprocessors idle (twice its CTAs, two a multiprocessor)
// (12 by TMA was never the fastest on the H200, at any CTA count: results/h200-tune-tma2.md.)
// Off Hopper (or in a build without sm_90a code) a forced wgmma index runs kWgmmaFallback's config.
using Cfg0 = MmaConfig<16, 64, 128, 1, 4, 4>;
using Cfg1 = MmaConfig<16, 128, 64, 1, 4, 4>;
using Cfg2 = MmaConfig<32, 128, 64, 1, 4, 4>;
using Cfg3 = MmaConfig<64, 128, 64, 2, 2, 4>;
using Cfg4 = MmaConfig<64, 64, 64, 2, 2, 4>;
using Cfg5 = MmaConfig<128, 128, 32, 2, 4, 4>;
using Cfg6 = MmaConfig<128, 128, 64, 2, 4, 3>;
using Cfg7 = MmaConfig<64, 128, 32, 2, 2, 4>;
using Cfg8 = MmaConfig<64, 128, 64, 2, 4, 4>;
using Cfg9 = MmaConfig<128, 128, 64, 2, 2, 3>;
using Cfg10 = MmaConfig<32, 64, 128, 1, 4, 4>;
using Cfg11 = MmaConfig<16, 32, 128, 1, 2, 4>;
using Cfg12 = gg::WgmmaConfig<128, 128, 2, 1, 5>;
using Cfg13 = gg::WgmmaConfig<128, 256, 2, 1, 4>;
using Cfg14 = gg::WgmmaConfig<64, 256, 1, 2, 4>;
using Cfg15 = gg::WgmmaConfig<128, 256, 2, 1, 4, false, true>;
using Cfg16 = gg::WgmmaConfig<64, 256, 1, 2, 4, false, true>;
using Cfg17 = gg::WgmmaConfig<192, 256, 3, 1, 4, false, true>;
using Cfg18 = gg::WgmmaConfig<64, 128, 1, 1, 4, false, true>;
constexpr int kNumMmaConfigs = 12;  // below: mma.sync, from here on wgmma (= bench/tile_table.py's FIRST_WGMMA_CONFIG)
constexpr int kNumConfigs = 19;
constexpr int kWgmmaFallback[kNumConfigs - kNumMmaConfigs] = {9, 9, 3, 9, 3, 9, 3};
constexpr int kConfigBM[kNumConfigs] = {Cfg0::BM,  Cfg1::BM,  Cfg2::BM,  Cfg3::BM,  Cfg4::BM,  Cfg5::BM,  Cfg6::BM,
                                        Cfg7::BM,  Cfg8::BM,  Cfg9::BM,  Cfg10::BM, Cfg11::BM, Cfg12::BM, Cfg13::BM,
                                        Cfg14::BM, Cfg15::BM, Cfg16::BM, Cfg17::BM, Cfg18::BM};
constexpr int kConfigBN[kNumConfigs] = {Cfg0::BN,  Cfg1::BN,  Cfg2::BN,  Cfg3::BN,  Cfg4::BN,  Cfg5::BN,  Cfg6::BN,
                                        Cfg7::BN,  Cfg8::BN,  Cfg9::BN,  Cfg10::BN, Cfg11::BN, Cfg12::BN, Cfg13::BN,
                                        Cfg14::BN, Cfg15::BN, Cfg16::BN, Cfg17::BN, Cfg18::BN};
// K % 8 != 0 or a base not 16-byte aligned (rows not 16-byte aligned: guarded scalar loads) always
// takes this config: one extra instance per dtype instead of a second copy of the table, for shapes
// no production model has.
constexpr int kUnalignedConfig = 1;

// CTAs that do work, estimated from shapes alone (num_tokens_post_padded stays on the device): at
// most one partial block per expert hit on top of the full blocks.
int64_t estimated_ctas(int bm, int bn, int64_t rows, int64_t E, int64_t N, int64_t num_blocks, int64_t block_size) {
  const int64_t blocks = std::min(num_blocks, ceil_div64(rows, block_size) + std::min(E, rows));
  return blocks * ceil_div64(block_size, bm) * ceil_div64(N, bn);
}

// The SiLU-and-mul configs (moe_grouped_gemm_silu): BN output columns of [*, I] from 2 * BN rows of
// w13 a stage, so a stage holds (BM + 2 * BN) rows. Shared memory for 16-bit types:
//  idx  BM   BN   BK  warps  stages  smem bytes  meant for
//   0   16   64   64   1x4     4      82,944     decode (block size 16), many CTAs; config 1's B tile
//   1   16   32  128   1x2     4      87,040     decode, few CTAs; config 11 / config 0's bytes a stage
//   2   64   64   64   2x2     4     110,592     block size 32 / 64 (prefill); config 3's bytes a stage
//   3  128   64   64   2x4     3     110,592     block size 128 (prefill); 8 warps of 64 x 16 (x2 sets)
//   4  128  128   64   2x1     4     197,632     wgmma (Hopper), block size 128; falls back to config 3 off Hopper
//   5  128  128   64   2x1     4     197,632     4 with the weight tile by TMA; config 3 off Hopper
//   6  192  128   64   3x1     4     230,400     5 with three warpgroups: block size 192
// Which config serves which shapes is the tuned table's (kTunedSiluConfig in grouped_gemm_table.h, by silu_bucket
// below). fused_moe fuses only off Hopper and from block size 32, so the table serves those layers and callers of
// moe_grouped_gemm_silu and fuse_silu=True.
using SiluCfg0 = MmaConfig<16, 64, 64, 1, 4, 4, true>;
using SiluCfg1 = MmaConfig<16, 32, 128, 1, 2, 4, true>;
using SiluCfg2 = MmaConfig<64, 64, 64, 2, 2, 4, true>;
using SiluCfg3 = MmaConfig<128, 64, 64, 2, 4, 3, true>;
using SiluCfg4 = gg::WgmmaConfig<128, 128, 2, 1, 4, true>;
using SiluCfg5 = gg::WgmmaConfig<128, 128, 2, 1, 4, true, true>;
using SiluCfg6 = gg::WgmmaConfig<192, 128, 3, 1, 4, true, true>;
constexpr int kNumSiluMmaConfigs = 4;
constexpr int kNumSiluConfigs = 7;
constexpr int kSiluWgmmaFallback[kNumSiluConfigs - kNumSiluMmaConfigs] = {3, 3, 3};
constexpr int kSiluConfigBM[kNumSiluConfigs] = {SiluCfg0::BM, SiluCfg1::BM, SiluCfg2::BM, SiluCfg3::BM,
                                                SiluCfg4::BM, SiluCfg5::BM, SiluCfg6::BM};
constexpr int kSiluConfigBN[kNumSiluConfigs] = {SiluCfg0::BN, SiluCfg1::BN, SiluCfg2::BN, SiluCfg3::BN,
                                                SiluCfg4::BN, SiluCfg5::BN, SiluCfg6::BN};
constexpr int kSiluUnalignedConfig = 0;

// Whether a device of compute capability cc runs this build's wgmma kernels: sm_90a code built
// (MOE_EXT_WGMMA) and a cc 9.0 device (sm_90a code runs on no other).
bool wgmma_available(int cc) {
#if defined(MOE_EXT_WGMMA)
  return cc == 90;
#else
  (void)cc;
  return false;
#endif
}

// The plain GEMM's heuristic: gemm_bucket sorts a call's shapes into the buckets of grouped_gemm_table.h, whose
// config per bucket bench/tune_grouped_gemm.py --emit-table fills from timings (bench/tile_table.py: the least
// total time over the tuned shapes that fall in the bucket, with a 2% margin for the incumbent). The buckets are the
// structure, written here from measurements
// (bench/NOTES.md, sessions 9-17):
// - off Hopper (or where no Hopper bucket applies), rows by block size (<= 16, 32, 64, 128, larger), each split by
//   whether a reference tile's grid fills the GPU (>= two CTAs a multiprocessor): the tile of the row's "many"
//   config in session 24's hand-filled table, fixed so that the buckets do not move with the tuned configs;
// - on Hopper (a cc 9.0 device and sm_90a code: the wgmma tiles), blocks of a multiple of 192 rows (three
//   warpgroups under one weight tile: a third less weight traffic a row through L2, whose partition link bounds
//   the prefill tiles, session 15), then "narrow" shapes where a hit expert expects at most kNarrowRowsPerExpert
//   rows (one 64-row m-tile then mostly holds an expert's rows, so two CTAs a multiprocessor of the 64 x 128 tile
//   keep a prologue under another CTA's stream, session 17; 16 and not 32 because DeepSeek-V3's skewed routing puts
//   many experts over 64 rows at 32 on average), decode blocks (< 64 rows) only where that tile's grid fills the
//   GPU twice over (else the mma rows: Mixtral's w2 at T=2, 96 CTAs, streamed faster on mma.sync), and the
//   64-row blocks split by whether the 64 x 256 tile's grid fills the GPU.
constexpr int64_t kNarrowRowsPerExpert = 16;
constexpr int kMmaRowMaxBlock[] = {16, 32, 64, 128};  // then larger: kMmaLargeMany / kMmaLargeFew
constexpr int kMmaRowSplitConfig[5] = {11, 8, 3, 9, 6};  // session 24's "many" configs, whose tiles split the rows
static_assert(kMmaLargeMany == kMma16Many + 2 * 4 && kMmaLargeFew == kMmaLargeMany + 1 && kMma16Few == kMma16Many + 1 &&
                  kNumMmaBuckets == kMmaLargeFew + 1,
              "grouped_gemm_table.h: the mma buckets come in (many, few) pairs by kMmaRowMaxBlock");

// Both ops' mma.sync bucket (MmaBucket): the row by block size, many or few by the CTA count of the row's reference
// tile split[row] (BM, BN: the op's tile shapes).
template <size_t kConfigs>
MmaBucket mma_bucket(const int (&split)[5], const int (&bm)[kConfigs], const int (&bn)[kConfigs], int64_t rows,
                     int64_t E, int64_t N, int64_t num_blocks, int64_t block_size, int num_sms) {
  int row = 0;
  while (row < 4 && block_size > kMmaRowMaxBlock[row]) ++row;
  const int ref = split[row];
  const int64_t ctas = estimated_ctas(bm[ref], bn[ref], rows, E, N, num_blocks, block_size);
  return static_cast<MmaBucket>(kMma16Many + 2 * row + (ctas >= 2 * num_sms ? 0 : 1));
}

// A MmaBucket or a GemmBucket. wgmma: the Hopper tiles may run (a cc 9.0 device, a build with sm_90a code).
int gemm_bucket(bool wgmma, int64_t rows, int64_t E, int64_t N, int64_t num_blocks, int64_t block_size, int num_sms) {
  const auto mma = [&] {
    return mma_bucket(kMmaRowSplitConfig, kConfigBM, kConfigBN, rows, E, N, num_blocks, block_size, num_sms);
  };
  if (!wgmma) return mma();
  if (block_size % Cfg17::BM == 0) return kHopper192;
  const bool narrow = rows <= kNarrowRowsPerExpert * E;
  if (block_size < 64) {
    const int64_t ctas = estimated_ctas(Cfg18::BM, Cfg18::BN, rows, E, N, num_blocks, block_size);
    return narrow && ctas >= 2 * num_sms ? int{kHopperDecode} : int{mma()};
  }
  if (narrow) return kHopperNarrow;
  if (block_size >= 128) return kHopper128;
  const int64_t ctas = estimated_ctas(Cfg16::BM, Cfg16::BN, rows, E, N, num_blocks, block_size);
  return ctas >= 2 * num_sms ? kHopper64Many : kHopper64Few;
}
static_assert(Cfg16::BM == 64 && Cfg16::BN == 256 && Cfg17::BM == 192 && Cfg18::BM == 64 && Cfg18::BN == 128,
              "gemm_bucket's tile shapes");

// The SiLU-and-mul variant's buckets (SiluBucket in grouped_gemm_table.h): the mma.sync rows as the plain GEMM's,
// split by the SiLU configs' own reference tiles (the "many" configs of its session-24 hand table), and on Hopper
// blocks of a multiple of 192 rows, then blocks of 128 or more split by narrow (as gemm_bucket), then the mma row of
// 33-64-row blocks as Hopper buckets of their own (there the decode and wgmma tiles beat that row's 64 x 64 mma.sync
// tile: session 26's tuner, bench/results/h200-tune-silu-table-s26b-hopper.md); smaller blocks take the mma rows on
// Hopper too.
constexpr int kSiluRowSplitConfig[5] = {1, 2, 2, 3, 3};

// A MmaBucket or a SiluBucket.
int silu_bucket(bool wgmma, int64_t rows, int64_t E, int64_t I, int64_t num_blocks, int64_t block_size, int num_sms) {
  if (wgmma && block_size % SiluCfg6::BM == 0) return kSiluHopper192;
  if (wgmma && block_size >= SiluCfg5::BM)
    return rows <= kNarrowRowsPerExpert * E ? kSiluHopperNarrow : kSiluHopper128;
  const MmaBucket mma =
      mma_bucket(kSiluRowSplitConfig, kSiluConfigBM, kSiluConfigBN, rows, E, I, num_blocks, block_size, num_sms);
  if (wgmma && mma == kMma64Many) return kSiluHopper64Many;
  if (wgmma && mma == kMma64Few) return kSiluHopper64Few;
  return mma;
}
static_assert(SiluCfg5::BM == 128 && SiluCfg6::BM == 192, "silu_bucket's tile shapes");

// A tuned table names configs of its op's table, mma.sync ones only in the mma buckets (they also serve GPUs
// without the Hopper tiles).
template <size_t kBuckets>
constexpr bool tuned_table_valid(const int (&table)[kBuckets], int num_configs, int num_mma_configs) {
  for (size_t b = 0; b < kBuckets; ++b) {
    const int cfg = table[b];
    if (cfg < 0 || cfg >= num_configs || (b < kNumMmaBuckets && cfg >= num_mma_configs)) return false;
  }
  return true;
}
static_assert(tuned_table_valid(kTunedGemmConfig, kNumConfigs, kNumMmaConfigs),
              "grouped_gemm_table.h: a config outside the table, or a wgmma one in an mma bucket");
static_assert(tuned_table_valid(kTunedSiluConfig, kNumSiluConfigs, kNumSiluMmaConfigs),
              "grouped_gemm_table.h: a SiLU config outside the table, or a wgmma one in an mma bucket");

// cuTensorMapEncodeTiled, taken from the driver through the runtime (no link against libcuda).
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
EncodeTiledFn encode_tiled_fn() {
  static const EncodeTiledFn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found);
    return err == cudaSuccess && found == cudaDriverEntryPointSuccess ? reinterpret_cast<EncodeTiledFn>(f) : nullptr;
  }();
  return fn;
}

// The weight tensor map of a TMA config: w as [E][sets][N][K] (K innermost, 16-byte aligned rows:
// the launcher's K % 8 == 0), boxes of 64 x BN, the 128-byte swizzle the kernel's descriptors
// read, rows and K past the ends zero-filled.
template <typename T, typename Cfg>
cudaError_t weight_tensor_map(const GroupedGemmParams& p, CUtensorMap& map) {
  const EncodeTiledFn encode = encode_tiled_fn();
  if (encode == nullptr) return cudaErrorNotSupported;
  constexpr auto kType = std::is_same_v<T, __nv_bfloat16> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                          : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const cuuint64_t dims[4] = {cuuint64_t(p.K), cuuint64_t(p.N), cuuint64_t(Cfg::kSets), cuuint64_t(p.num_experts)};
  const cuuint64_t row = cuuint64_t(p.K) * sizeof(T);
  const cuuint64_t strides[3] = {row, row * p.N, row * p.N * Cfg::kSets};  // bytes, dims 1..3
  const cuuint32_t box[4] = {Cfg::BK, Cfg::BN, 1, 1};
  const cuuint32_t unit[4] = {1, 1, 1, 1};
  const CUresult res = encode(&map, kType, 4, const_cast<void*>(p.w), dims, strides, box, unit,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return res == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

template <typename T, typename Cfg>
cudaError_t launch_wgmma(GroupedGemmParams p, int64_t num_blocks, cudaStream_t stream) {
  p.tiles_per_block = gg::ceil_div(p.block_size, Cfg::BM);
  const int64_t tiles = num_blocks * p.tiles_per_block * ceil_div64(p.N, Cfg::BN);
  if (tiles > INT_MAX) return cudaErrorInvalidValue;
  constexpr int smem = Cfg::kSmemBytes;
  static_assert(smem + 8 * Cfg::BM + 8 * Cfg::STAGES <= 227 * 1024, "over the sm_90 per-block shared memory limit");
  CUtensorMap map{};
  // K == 0 runs no k-tile and E == 0 no tile at all: no copy reads the map, and neither is a valid one.
  if (Cfg::kTma && p.K > 0 && p.num_experts > 0) {
    if (const cudaError_t err = weight_tensor_map<T, Cfg>(p, map); err != cudaSuccess) return err;
  }
  if (const cudaError_t err = allow_dynamic_smem<grouped_gemm_wgmma_kernel<T, Cfg>>(smem); err != cudaSuccess)
    return err;
  grouped_gemm_wgmma_kernel<T, Cfg><<<static_cast<unsigned>(tiles), Cfg::kThreads, smem, stream>>>(p, map);
  return cudaGetLastError();
}

template <typename T, typename Cfg, bool kAligned>
cudaError_t launch_mma(GroupedGemmParams p, int64_t num_blocks, cudaStream_t stream) {
  p.tiles_per_block = gg::ceil_div(p.block_size, Cfg::BM);
  const int64_t tiles = num_blocks * p.tiles_per_block;
  if (tiles > INT_MAX || ceil_div64(p.N, Cfg::BN) > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(ceil_div64(p.N, Cfg::BN)));
  constexpr int smem = Cfg::template smem_bytes<T>();
  static_assert(smem <= 227 * 1024, "over the sm_90 per-block shared memory limit");
  const cudaError_t err = allow_dynamic_smem<grouped_gemm_mma_kernel<T, Cfg, kAligned>>(smem);
  if (err != cudaSuccess) return err;
  grouped_gemm_mma_kernel<T, Cfg, kAligned><<<grid, Cfg::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_mma_config(int cfg, bool aligned, bool wgmma, const GroupedGemmParams& p, int64_t num_blocks,
                              cudaStream_t stream) {
  if (!aligned) return launch_mma<T, Cfg1, false>(p, num_blocks, stream);
  static_assert(kUnalignedConfig == 1, "the unaligned instance above must match kUnalignedConfig");
  if (cfg >= kNumMmaConfigs) {
    if (!wgmma) return launch_mma_config<T>(kWgmmaFallback[cfg - kNumMmaConfigs], true, false, p, num_blocks, stream);
    return dispatch_config<Cfg12, Cfg13, Cfg14, Cfg15, Cfg16, Cfg17, Cfg18>(cfg - kNumMmaConfigs, [&](auto c) {
      return launch_wgmma<T, decltype(c)>(p, num_blocks, stream);
    });
  }
  return dispatch_config<Cfg0, Cfg1, Cfg2, Cfg3, Cfg4, Cfg5, Cfg6, Cfg7, Cfg8, Cfg9, Cfg10, Cfg11>(cfg, [&](auto c) {
    return launch_mma<T, decltype(c), true>(p, num_blocks, stream);
  });
}

template <typename T>
cudaError_t launch_silu_config(int cfg, bool aligned, bool wgmma, const GroupedGemmParams& p, int64_t num_blocks,
                               cudaStream_t stream) {
  if (!aligned) return launch_mma<T, SiluCfg0, false>(p, num_blocks, stream);
  static_assert(kSiluUnalignedConfig == 0, "the unaligned instance above must match kSiluUnalignedConfig");
  if (cfg >= kNumSiluMmaConfigs) {
    if (!wgmma)
      return launch_silu_config<T>(kSiluWgmmaFallback[cfg - kNumSiluMmaConfigs], true, false, p, num_blocks, stream);
    return dispatch_config<SiluCfg4, SiluCfg5, SiluCfg6>(cfg - kNumSiluMmaConfigs, [&](auto c) {
      return launch_wgmma<T, decltype(c)>(p, num_blocks, stream);
    });
  }
  return dispatch_config<SiluCfg0, SiluCfg1, SiluCfg2, SiluCfg3>(cfg, [&](auto c) {
    return launch_mma<T, decltype(c), true>(p, num_blocks, stream);
  });
}
// The heuristics' picks (config -1). wgmma: the Hopper tiles may run (aligned operands, a cc 9.0 device, a
// build with sm_90a code). Operands that are not 16-byte aligned run the unaligned instance whatever the pick.
int plain_heuristic(bool wgmma, int64_t rows, int64_t E, int64_t N, int64_t num_blocks, int64_t block_size,
                    int num_sms) {
  return kTunedGemmConfig[gemm_bucket(wgmma, rows, E, N, num_blocks, block_size, num_sms)];
}
int silu_heuristic(bool wgmma, int64_t rows, int64_t E, int64_t I, int64_t num_blocks, int64_t block_size,
                   int num_sms) {
  return kTunedSiluConfig[silu_bucket(wgmma, rows, E, I, num_blocks, block_size, num_sms)];
}
#else
constexpr int kNumConfigs = 0;
constexpr int kNumSiluConfigs = 0;
#endif  // MOE_GG_HAS_MMA

template <typename T>
cudaError_t launch_simt(GroupedGemmParams p, int64_t num_blocks, cudaStream_t stream) {
  p.tiles_per_block = gg::ceil_div(p.block_size, gg::kSimtBM);
  const int64_t tiles = num_blocks * p.tiles_per_block;
  if (tiles > INT_MAX || ceil_div64(p.N, gg::kSimtBN) > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(ceil_div64(p.N, gg::kSimtBN)));
  grouped_gemm_simt_kernel<T><<<grid, gg::kSimtThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0; }

// Second pass over the rows (a flag byte each), writing zeros only where no block wrote.
template <typename T>
cudaError_t zero_uncovered_rows(const uint8_t* covered, void* out, int64_t rows, int64_t N, int num_sms,
                                cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t grid =
      std::max<int64_t>(1, std::min<int64_t>(ceil_div64(rows, kThreads / kWarpSize), int64_t(num_sms) * 8));
  if (N % Vec<T>::kSize == 0 && aligned16(out)) {
    zero_uncovered_rows_kernel<T, true><<<grid, kThreads, 0, stream>>>(covered, static_cast<T*>(out), rows, N);
  } else {
    zero_uncovered_rows_kernel<T, false><<<grid, kThreads, 0, stream>>>(covered, static_cast<T*>(out), rows, N);
  }
  return cudaGetLastError();
}

}  // namespace

int grouped_gemm_num_configs() { return kNumConfigs; }
#if MOE_GG_HAS_MMA
int grouped_gemm_num_buckets(bool silu) { return silu ? int{kNumSiluBuckets} : int{kNumGemmBuckets}; }
#else
int grouped_gemm_num_buckets(bool silu) {
  (void)silu;
  return 0;
}
#endif
int grouped_gemm_silu_num_configs() { return kNumSiluConfigs; }

int grouped_gemm_heuristic_bucket(bool silu, int64_t rows, int64_t K, int64_t E, int64_t N, int64_t num_blocks,
                                  int64_t block_size, int compute_capability, int num_sms) {
#if MOE_GG_HAS_MMA
  if (compute_capability < 80 || rows <= 0 || N <= 0 || num_blocks <= 0 || block_size <= 0 || K % 8 != 0) return -1;
  const bool wgmma = wgmma_available(compute_capability);
  return silu ? silu_bucket(wgmma, rows, E, N, num_blocks, block_size, num_sms)
              : gemm_bucket(wgmma, rows, E, N, num_blocks, block_size, num_sms);
#else
  (void)silu, (void)rows, (void)K, (void)E, (void)N, (void)num_blocks, (void)block_size, (void)compute_capability,
      (void)num_sms;
  return -1;
#endif
}

int grouped_gemm_heuristic_config(bool silu, int64_t rows, int64_t N, int64_t K, int64_t E, int64_t num_blocks,
                                  int64_t block_size, int compute_capability, int num_sms) {
#if MOE_GG_HAS_MMA
  if (compute_capability < 80 || rows <= 0 || N <= 0 || num_blocks <= 0 || block_size <= 0) return -1;
  if (K % 8 != 0) return silu ? kSiluUnalignedConfig : kUnalignedConfig;
  const bool wgmma = wgmma_available(compute_capability);
  return silu ? silu_heuristic(wgmma, rows, E, N, num_blocks, block_size, num_sms)
              : plain_heuristic(wgmma, rows, E, N, num_blocks, block_size, num_sms);
#else
  (void)silu, (void)rows, (void)N, (void)K, (void)E, (void)num_blocks, (void)block_size, (void)compute_capability,
      (void)num_sms;
  return -1;
#endif
}

cudaError_t moe_grouped_gemm(DType dtype, const void* a, const void* w, const int32_t* sorted_ids,
                             const int32_t* expert_ids, const int32_t* num_post_padded, const float* topk_weights,
                             void* out, uint8_t* covered, int64_t M, int64_t topk, int64_t N, int64_t K, int64_t E,
                             int64_t num_blocks, int64_t block_size, int config, int compute_capability, int num_sms,
                             cudaStream_t stream) {
  const int64_t rows = M * topk;
  if (rows == 0 || N == 0) return cudaSuccess;
  if (config >= kNumConfigs || rows > INT_MAX || N > INT_MAX || K > INT_MAX || block_size > INT_MAX)
    return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    if (num_blocks > 0) {
      const GroupedGemmParams p{a, w, sorted_ids, expert_ids, num_post_padded, topk_weights, out, covered,
                                static_cast<int>(rows), static_cast<int>(topk), static_cast<int>(N),
                                static_cast<int>(K), static_cast<int>(E), static_cast<int>(block_size), 1};
      cudaError_t err;
      if constexpr (std::is_same_v<T, float>) {
        err = launch_simt<T>(p, num_blocks, stream);
      } else {
#if MOE_GG_HAS_MMA
        if (compute_capability >= 80) {
          const bool aligned = K % 8 == 0 && aligned16(a) && aligned16(w);
          const bool wgmma = wgmma_available(compute_capability);
          const int cfg =
              config >= 0 ? config : plain_heuristic(aligned && wgmma, rows, E, N, num_blocks, block_size, num_sms);
          err = launch_mma_config<T>(cfg, aligned, wgmma, p, num_blocks, stream);
        } else {
          err = launch_simt<T>(p, num_blocks, stream);
        }
#else
        err = launch_simt<T>(p, num_blocks, stream);
#endif
      }
      if (err != cudaSuccess) return err;
    }
    if (covered == nullptr) return cudaSuccess;
    return zero_uncovered_rows<T>(covered, out, rows, N, num_sms, stream);
  });
}

cudaError_t moe_grouped_gemm_silu(DType dtype, const void* a, const void* w13, const int32_t* sorted_ids,
                                  const int32_t* expert_ids, const int32_t* num_post_padded, void* out,
                                  uint8_t* covered, int64_t M, int64_t topk, int64_t I, int64_t K, int64_t E,
                                  int64_t num_blocks, int64_t block_size, int config, int compute_capability,
                                  int num_sms, cudaStream_t stream) {
  const int64_t rows = M * topk;
  if (rows == 0 || I == 0) return cudaSuccess;
  if (config >= kNumSiluConfigs || rows > INT_MAX || 2 * I > INT_MAX || K > INT_MAX || block_size > INT_MAX)
    return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;  // no fp32 tensor-core path: the adapter composes the two ops
    } else {
#if MOE_GG_HAS_MMA
      if (num_blocks > 0) {
        const GroupedGemmParams p{a, w13, sorted_ids, expert_ids, num_post_padded, nullptr, out, covered,
                                  static_cast<int>(rows), static_cast<int>(topk), static_cast<int>(I),
                                  static_cast<int>(K), static_cast<int>(E), static_cast<int>(block_size), 1};
        const bool aligned = K % 8 == 0 && aligned16(a) && aligned16(w13);
        const bool wgmma = wgmma_available(compute_capability);
        const int cfg =
            config >= 0 ? config : silu_heuristic(aligned && wgmma, rows, E, I, num_blocks, block_size, num_sms);
        const cudaError_t err = launch_silu_config<T>(cfg, aligned, wgmma, p, num_blocks, stream);
        if (err != cudaSuccess) return err;
      }
      if (covered == nullptr) return cudaSuccess;
      return zero_uncovered_rows<T>(covered, out, rows, I, num_sms, stream);
#else
      return cudaErrorInvalidValue;
#endif
    }
  });
}

}  // namespace moe_ext::cuda
