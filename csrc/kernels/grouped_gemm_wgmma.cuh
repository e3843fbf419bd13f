// Hopper (sm_90a) grouped expert GEMM on warpgroup MMA: the prefill-sized tiles of
// grouped_gemm_mma_kernel (same params, row logic, epilogue and output contract; see
// grouped_gemm.cuh), with the multiply issued as wgmma.mma_async from shared memory.
//
// A CTA is WG_M x WG_N warpgroups (4 warps each); warpgroup (i, j) owns rows [64 i, 64 i + 64) and
// columns [j WN, (j + 1) WN) of the BM x BN tile, as kUnits m64n256k16 (or m64n128k16) fp32
// accumulators per set in registers: the mma.sync fragment layout repeated over n8 column groups.
// Every thread streams the gathered A rows and the B (weight) rows with cp.async into a STAGES-deep
// ring, laid out as wgmma's K-major 128-byte swizzle reads it: BK = 64 elements (128 bytes) a row,
// 16-byte chunk c of row r at chunk c ^ (r % 8), each stage 1024-byte aligned; the descriptor
// steps 32 bytes per k16 slice. Copies run STAGES - 2 tiles ahead and one wgmma group stays in
// flight behind the barrier, so the stage refilled at tile kt (last read by tile kt - 2's group)
// is free once every warpgroup has passed wait_group 1 of tile kt - 1.
//
// Tile order: a 1-D grid walked in groups of kRasterGroup m-tiles, N-tiles within a group, so the
// CTAs in flight share a few experts' weight columns and a few m-tiles' gathered rows in L2 (the
// 2-D grid of the mma kernel runs all m-tiles of one N-tile first: every wave re-gathers A).
//
// Weight tiles by TMA (WgmmaConfig's kTma, configs marked TMA in the launcher's table): thread 0
// issues the bulk tensor copy of a stage's B tile (a 4-D tensor map over w as [E, sets, N, K],
// 128-byte swizzle: the bytes cp.async would write, out-of-range rows and K zero-filled) and arms
// the stage's mbarrier with its byte count; every thread waits on that barrier before the tile's
// MMAs. The A rows stay a per-thread cp.async gather, and the stage ring and its reuse are as
// above. (2-CTA clusters multicasting the weight tile to two m-tiles of one expert were slower, with
// or without a producer warp: bench/experiments/tma-pair*.patch, bench/NOTES.md.)
//
// Requirements, checked by the launcher: K % 8 == 0 and 16-byte aligned bases (the cp.async
// zero-fill handles the K tail), a cc 9.0 device, a build with sm_90a code (MOE_EXT_WGMMA). Other
// targets compile the kernel to a trap; the launcher never picks it there.
#pragma once

#include "grouped_gemm.cuh"

#if MOE_GG_HAS_MMA
#include <cuda.h>  // CUtensorMap (a type only: the launcher encodes maps through the runtime's entry point)
#endif

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOE_GG_WGMMA_DEVICE 1
#else
#define MOE_GG_WGMMA_DEVICE 0
#endif

namespace moe_ext {
namespace gg {

constexpr int kWarpgroupThreads = 128;  // wgmma's unit: 4 warps of 32 lanes
constexpr int kRasterGroup = 8;         // m-tiles per raster group

// kTma: the weight (B) tile of a stage by one thread's TMA instead of every thread's cp.async.
template <int BM_, int BN_, int WG_M_, int WG_N_, int STAGES_, bool kSiluMul_ = false, bool kTma_ = false>
struct WgmmaConfig {
  static constexpr int BM = BM_, BN = BN_, BK = 64, WG_M = WG_M_, WG_N = WG_N_, STAGES = STAGES_;
  static constexpr bool kSiluMul = kSiluMul_, kTma = kTma_;
  static constexpr int kSets = kSiluMul ? 2 : 1;  // accumulator sets (gate, up)
  static constexpr int kBRows = kSets * BN;       // weight rows of a stage's B tile
  static constexpr int kThreads = WG_M * WG_N * kWarpgroupThreads;
  static constexpr int WN = BN / WG_N;       // a warpgroup's columns (per set)
  static constexpr int kUnitN = WN % 256 == 0 ? 256 : 128;  // one wgmma's columns (m64n256k16 if it fits)
  static constexpr int kUnits = WN / kUnitN;  // wgmma accumulators per set
  static constexpr int kRowBytes = 128;      // BK 16-bit elements: one swizzle row
  static constexpr int kABytes = BM * kRowBytes;
  static constexpr int kStageBytes = (BM + kBRows) * kRowBytes;
  static constexpr int kBBytes = kBRows * kRowBytes;
  static constexpr int kRowsPerPass = kThreads / 8;  // tile rows one pass of 16-byte copies covers
  static constexpr int kPasses = (BM + (kTma ? 0 : kBRows)) / kRowsPerPass;  // cp.async passes a stage
  static constexpr int kSmemBytes = STAGES * kStageBytes + 1024;  // + slack to align the ring
  static_assert(kWarpSize == 32, "a warpgroup is 4 warps of 32 lanes");
  static_assert(BM == 64 * WG_M && WN % 128 == 0, "a warpgroup computes 64 rows x multiples of 128 columns");
  static_assert(BM % kRowsPerPass == 0 && (kTma || kBRows % kRowsPerPass == 0),
                "a copy pass is all A rows or all B rows (with TMA the threads copy A rows only)");
  static_assert(kStageBytes % 1024 == 0 && STAGES >= 3, "stages must keep the swizzle's 1024-byte alignment");
  static_assert(BN <= 256 && (BN * kRowBytes) % 1024 == 0, "a TMA box (one set's BN rows): <= 256, 1024-byte aligned");
};

// The 1-D grid's tile order (see the top of this file): CTA idx -> (m-tile, N-tile).
MOE_DEVICE MOE_FORCEINLINE void raster_tile(int idx, int tiles_m, int tiles_n, int& mtile, int& ntile) {
  const int group = idx / (kRasterGroup * tiles_n), in_group = idx % (kRasterGroup * tiles_n);
  const int m_first = group * kRasterGroup;
  const int group_m = min(kRasterGroup, tiles_m - m_first);
  mtile = m_first + in_group % group_m;
  ntile = in_group / group_m;
}

#if MOE_GG_HAS_MMA
// Shared-memory matrix descriptor of a K-major tile in the 128-byte swizzle: start address,
// leading offset 1 (unused for swizzled K-major), stride 1024 bytes between 8-row groups.
MOE_DEVICE MOE_FORCEINLINE uint64_t wgmma_desc_sw128(uint32_t smem_byte_addr) {
  return uint64_t((smem_byte_addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}

MOE_DEVICE MOE_FORCEINLINE void fence_proxy_async_shared() {
#if MOE_GG_WGMMA_DEVICE
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
MOE_DEVICE MOE_FORCEINLINE void wgmma_fence() {
#if MOE_GG_WGMMA_DEVICE
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
MOE_DEVICE MOE_FORCEINLINE void wgmma_commit() {
#if MOE_GG_WGMMA_DEVICE
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int kPending>
MOE_DEVICE MOE_FORCEINLINE void wgmma_wait() {
#if MOE_GG_WGMMA_DEVICE
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}

// mbarriers and bulk tensor copies (sm_90). Barrier and shared addresses are shared-window byte
// addresses (smem_addr).
MOE_DEVICE MOE_FORCEINLINE void mbar_init(uint32_t bar, uint32_t count) {
#if MOE_GG_WGMMA_DEVICE
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}
// Makes the inits visible to the async proxy (the TMA unit's arrivals) before any copy.
MOE_DEVICE MOE_FORCEINLINE void fence_mbar_init() {
#if MOE_GG_WGMMA_DEVICE
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
MOE_DEVICE MOE_FORCEINLINE void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#if MOE_GG_WGMMA_DEVICE
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#endif
}
// Spins until the barrier's phase of the given parity has completed.
MOE_DEVICE MOE_FORCEINLINE void mbar_wait(uint32_t bar, uint32_t parity) {
#if MOE_GG_WGMMA_DEVICE
  asm volatile(
      "{\n.reg .pred done;\nretry:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra retry;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#endif
}
// Box {c0 (K), c1 (row), c2 (set), c3 (expert)} of the tensor map into dst, completing its bytes
// on bar.
MOE_DEVICE MOE_FORCEINLINE void tma_load_4d(uint32_t dst, const void* tmap, uint32_t bar, int c0, int c1, int c2,
                                            int c3) {
#if MOE_GG_WGMMA_DEVICE
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, "
      "%5}], [%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
#endif
}

#define MOE_WGMMA_D8(i)                                                                                      \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])
#define MOE_WGMMA_D64(i)                                                                                        \
  MOE_WGMMA_D8(i), MOE_WGMMA_D8(i + 8), MOE_WGMMA_D8(i + 16), MOE_WGMMA_D8(i + 24), MOE_WGMMA_D8(i + 32),      \
      MOE_WGMMA_D8(i + 40), MOE_WGMMA_D8(i + 48), MOE_WGMMA_D8(i + 56)
#define MOE_WGMMA_REGS_0_63 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define MOE_WGMMA_REGS_64_127 \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
// One m64nNk16 instruction: N/2 accumulators per thread, then the two descriptors, then scale-d
// (1: accumulate); A and B K-major (no transpose), unscaled.
#define MOE_WGMMA_ASM(shape, ab_type, regs, desc_ops, scale_op, ...)                                          \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " scale_op ", 0;\n"                                        \
               "wgmma.mma_async.sync.aligned." shape ".f32." ab_type "." ab_type " {" regs "}, " desc_ops     \
               ", p, 1, 1, 0, 0;\n}\n"                                                                       \
               : __VA_ARGS__                                                                                  \
               : "l"(desc_a), "l"(desc_b), "n"(1))

// d += A[64, 16] * B[kN, 16]^T, both K-major in shared memory (descriptors), fp32 accumulators;
// kN 128 or 256.
template <typename T, int kN>
MOE_DEVICE MOE_FORCEINLINE void wgmma_m64k16(float (&d)[kN / 2], uint64_t desc_a, uint64_t desc_b) {
  static_assert(kN == 128 || kN == 256, "wgmma tile widths built here: 128, 256");
#if MOE_GG_WGMMA_DEVICE
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  if constexpr (kN == 128 && kBf16) {
    MOE_WGMMA_ASM("m64n128k16", "bf16", MOE_WGMMA_REGS_0_63, "%64, %65", "%66", MOE_WGMMA_D64(0));
  } else if constexpr (kN == 128) {
    MOE_WGMMA_ASM("m64n128k16", "f16", MOE_WGMMA_REGS_0_63, "%64, %65", "%66", MOE_WGMMA_D64(0));
  } else if constexpr (kBf16) {
    MOE_WGMMA_ASM("m64n256k16", "bf16", MOE_WGMMA_REGS_0_63 ", " MOE_WGMMA_REGS_64_127, "%128, %129", "%130",
                  MOE_WGMMA_D64(0), MOE_WGMMA_D64(64));
  } else {
    MOE_WGMMA_ASM("m64n256k16", "f16", MOE_WGMMA_REGS_0_63 ", " MOE_WGMMA_REGS_64_127, "%128, %129", "%130",
                  MOE_WGMMA_D64(0), MOE_WGMMA_D64(64));
  }
#endif
}
#undef MOE_WGMMA_ASM
#undef MOE_WGMMA_REGS_64_127
#undef MOE_WGMMA_REGS_0_63
#undef MOE_WGMMA_D64
#undef MOE_WGMMA_D8
#endif  // MOE_GG_HAS_MMA

}  // namespace gg

#if MOE_GG_HAS_MMA
// Cfg is a gg::WgmmaConfig, T bf16 or fp16. Grid: 1-D, tiles_m x ceil(N / BN) CTAs (see the tile
// order above). Dynamic smem: Cfg::kSmemBytes. tmap: w as a 4-D tensor map (Cfg::kTma only, unused
// otherwise), box {64, BN, 1, 1}, 128-byte swizzle.
template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, MOE_EXT_GEMM_MIN_BLOCKS)
    grouped_gemm_wgmma_kernel(const GroupedGemmParams p, const __grid_constant__ CUtensorMap tmap) {
#if MOE_GG_WGMMA_DEVICE
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, STAGES = Cfg::STAGES;
  extern __shared__ unsigned char gg_smem[];
  __shared__ int s_id[BM], s_tok[BM];
  __shared__ alignas(8) uint64_t s_full[STAGES];  // TMA configs: stage s's B tile has landed

  const int tiles_n = gg::ceil_div(p.N, BN);
  int mtile, ntile;
  gg::raster_tile(static_cast<int>(blockIdx.x), static_cast<int>(gridDim.x) / tiles_n, tiles_n, mtile, ntile);
  const int e = gg::setup_tile_rows<BM>(p, mtile, ntile, s_id, s_tok);
  if (e < 0) return;
  const int tid = threadIdx.x;
  const int n0 = ntile * BN;
  const int K = p.K;
  const T* a = static_cast<const T*>(p.a);
  const T* w = static_cast<const T*>(p.w) + int64_t(e) * Cfg::kSets * p.N * K;

  // Thread tid copies chunk tid % 8 of rows tid / 8 + pass * kRowsPerPass (A rows, then, without
  // TMA, B rows) of every stage; their sources and swizzled offsets are fixed, so resolve them once.
  const int chunk = tid % 8;
  const T* src[Cfg::kPasses];
  uint32_t dst[Cfg::kPasses];
#pragma unroll
  for (int i = 0; i < Cfg::kPasses; ++i) {
    const int r = tid / 8 + i * Cfg::kRowsPerPass;
    dst[i] = r * Cfg::kRowBytes + ((chunk ^ (r % 8)) * 16);
    if (r < BM) {
      const int tok = s_tok[r];
      src[i] = tok >= 0 ? a + int64_t(tok) * K : nullptr;
    } else {  // B row: set (r - BM) / BN (gate, up), column n0 + (r - BM) % BN
      const int rb = r - BM, n = n0 + rb % BN;
      src[i] = n < p.N ? w + (int64_t(rb / BN) * p.N + n) * K : nullptr;
    }
  }
  const uint32_t smem_base = gg::smem_addr(gg_smem);
  const uint32_t ring = (smem_base + 1023u) & ~1023u;  // the swizzle pattern is anchored at 1024 bytes
  unsigned char* ring_ptr = gg_smem + (ring - smem_base);
  const uint32_t full0 = gg::smem_addr(s_full);

  auto load_stage = [&](int stage, int k0) {
    unsigned char* s = ring_ptr + stage * Cfg::kStageBytes;
    const int k = k0 + chunk * 8;
#pragma unroll
    for (int i = 0; i < Cfg::kPasses; ++i) {
      const bool ok = src[i] != nullptr && k < K;  // K % 8 == 0: the whole chunk is in range
      gg::cp_async16(s + dst[i], ok ? src[i] + k : a, ok ? 16 : 0);
    }
  };
  // Thread 0 only: arms the stage's barrier with the B tile's bytes and copies one box a set.
  auto load_b = [&](int stage, int k0) {
    const uint32_t bar = full0 + stage * 8;
    const uint32_t b = ring + stage * Cfg::kStageBytes + Cfg::kABytes;
    gg::mbar_arrive_expect_tx(bar, Cfg::kBBytes);
#pragma unroll
    for (int set = 0; set < Cfg::kSets; ++set)
      gg::tma_load_4d(b + set * BN * Cfg::kRowBytes, &tmap, bar, k0, n0, set, e);
  };
  if constexpr (Cfg::kTma) {
    if (tid == 0) {
      for (int s = 0; s < STAGES; ++s) gg::mbar_init(full0 + s * 8, 1);
      gg::fence_mbar_init();
    }
    __syncthreads();
  }

  const int wg = tid / gg::kWarpgroupThreads;
  const int wg_m = wg / Cfg::WG_N, wg_n = wg % Cfg::WG_N;
  // A warpgroup whose 64 rows hold no token (the padded tail of an expert's last block) skips its
  // MMAs, so a block's padding costs tensor time in 64-row steps, not BM-row ones. Every warp of
  // the warpgroup reads the same 64 rows: the flag is warpgroup-uniform, as wgmma requires.
  bool wg_active = false;
  for (int r = lane_id(); r < 64; r += kWarpSize) wg_active |= s_tok[wg_m * 64 + r] >= 0;
  wg_active = any_lane(wg_active);
  constexpr int kUnitN = Cfg::kUnitN;
  float acc[Cfg::kSets][Cfg::kUnits][kUnitN / 2];
#pragma unroll
  for (int s = 0; s < Cfg::kSets; ++s)
#pragma unroll
    for (int u = 0; u < Cfg::kUnits; ++u)
#pragma unroll
      for (int j = 0; j < kUnitN / 2; ++j) acc[s][u][j] = 0.0f;

  const int k_tiles = gg::ceil_div(K, BK);
#pragma unroll
  for (int s = 0; s < STAGES - 2; ++s) {
    if (s < k_tiles) {
      load_stage(s, s * BK);
      if (Cfg::kTma && tid == 0) load_b(s, s * BK);
    }
    gg::cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    gg::cp_async_wait<STAGES - 3>();  // this thread's copies of tile kt have landed
    gg::fence_proxy_async_shared();   // ... and are visible to wgmma's (async proxy) reads
    // All copies of tile kt visible; every warpgroup's tile kt - 2 group retired (wait_group 1 of
    // the last iteration), so its stage, refilled below, is free in this CTA.
    __syncthreads();
    const int next = kt + STAGES - 2;
    if (next < k_tiles) load_stage(next % STAGES, next * BK);
    gg::cp_async_commit();
    // Every thread, active or not, follows the full barrier's phases (thread 0 must have seen a
    // stage's last phase complete before it arms the next).
    if constexpr (Cfg::kTma) gg::mbar_wait(full0 + (kt % STAGES) * 8, (kt / STAGES) & 1);

    if (wg_active) {
      const uint32_t stage = ring + (kt % STAGES) * Cfg::kStageBytes;
      const uint32_t a_addr = stage + wg_m * 64 * Cfg::kRowBytes;
      gg::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        const uint64_t desc_a = gg::wgmma_desc_sw128(a_addr + kk * 32);
#pragma unroll
        for (int s = 0; s < Cfg::kSets; ++s)
#pragma unroll
          for (int u = 0; u < Cfg::kUnits; ++u) {
            const uint32_t b_addr =
                stage + Cfg::kABytes + (s * BN + wg_n * Cfg::WN + u * kUnitN) * Cfg::kRowBytes;
            gg::wgmma_m64k16<T, kUnitN>(acc[s][u], desc_a, gg::wgmma_desc_sw128(b_addr + kk * 32));
          }
      }
      gg::wgmma_commit();
    }
    // The B refill of stage (kt - 2) % STAGES (free since the barrier above), after this tile's
    // MMAs are issued.
    if (Cfg::kTma && tid == 0 && next < k_tiles) load_b(next % STAGES, next * BK);
    sync_warp();  // warp 0 reconverges before the .aligned wait
    gg::wgmma_wait<1>();
  }
  gg::wgmma_wait<0>();
  gg::cp_async_wait<0>();  // no copy may outlive the CTA (only empty groups remain here)

  // Unit accumulator d[4 j + 0, 1]: row lane / 4 of the warp's 16, columns 8 j + 2 (lane % 4) + 0, 1;
  // d[4 j + 2, 3]: 8 rows below.
  const int lane = tid % kWarpSize, warp_in_wg = (tid / kWarpSize) % 4;
  const int r = wg_m * 64 + warp_in_wg * 16 + lane / 4;
  const int id_lo = s_id[r], id_hi = s_id[r + 8];
  const float s_lo = gg::row_scale(p, id_lo), s_hi = gg::row_scale(p, id_hi);
  const bool paired = p.N % 2 == 0;
#pragma unroll
  for (int u = 0; u < Cfg::kUnits; ++u) {
#pragma unroll
    for (int j = 0; j < kUnitN / 8; ++j) {
      const int col = n0 + wg_n * Cfg::WN + u * kUnitN + j * 8 + (lane % 4) * 2;
      gg::store_quad<T, Cfg::kSiluMul>(p, &acc[0][u][4 * j], &acc[Cfg::kSets - 1][u][4 * j], id_lo, s_lo, id_hi,
                                       s_hi, col, paired);
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // never launched: the launcher takes this path on cc 9.0 builds with sm_90a code only
#endif
}
#endif  // MOE_GG_HAS_MMA

}  // namespace moe_ext
