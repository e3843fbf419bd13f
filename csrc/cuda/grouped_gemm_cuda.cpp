// CUDA adapter of the grouped expert GEMM and of its SiLU-and-mul variant: validate, allocate
// through PyTorch, choose how unwritten rows get their zeros, launch on the current stream under a
// device guard.
//
// Environment (read on every call, so a tuner or a test can switch within one process):
//   MOE_EXT_GROUPED_GEMM_CONFIG  index into the launcher's config table (csrc/cuda/grouped_gemm.cu),
//                                -1 or unset for its heuristic.
//   MOE_EXT_GROUPED_GEMM_SILU_CONFIG  the same for moe_grouped_gemm_silu's table.
//   MOE_EXT_GROUPED_GEMM_TABLE   comma-separated configs, one per bucket of csrc/cuda/grouped_gemm_table.h, that
//                                moe_grouped_gemm's heuristic takes instead of the compiled table's (a table the
//                                tuner emitted, timed and tested before it is compiled in); unset: the compiled one.
//   MOE_EXT_GROUPED_GEMM_SILU_TABLE  the same for moe_grouped_gemm_silu's table (one config per bucket).
//   MOE_EXT_GROUPED_GEMM_ZERO    "memset" (zeroed output) or "flags" (covered-row flags and a zero
//                                pass); unset: memset up to kZeroFillMaxBytes of output, flags above.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "../core/validate.h"
#include "adapter_utils.h"
#include "grouped_gemm.h"

namespace moe_ext {
namespace {

// Output size up to which zeroing all of it first (one memset, ~1.5 us at 4 MiB on an H100) is
// cheaper than the flags path (a memset of M * topk bytes plus a kernel that reads them and zeroes
// only the rows no block wrote, typically a few percent of the output).
constexpr int64_t kZeroFillMaxBytes = int64_t{4} << 20;

// Largest N the grid covers: 65535 N-tiles of the heuristic's narrowest tile (64 columns; 32 for
// the SiLU-and-mul variant, whose few-CTA decode config is 32 wide).
constexpr int64_t kMaxN = int64_t{65535} * 64;
constexpr int64_t kMaxSiluI = int64_t{65535} * 32;

bool zero_fill_output(const char* op, int64_t out_bytes) {
  const char* s = std::getenv("MOE_EXT_GROUPED_GEMM_ZERO");
  if (s == nullptr || *s == '\0') return out_bytes <= kZeroFillMaxBytes;
  MOE_CHECK_VALUE(std::strcmp(s, "memset") == 0 || std::strcmp(s, "flags") == 0, "moe_ext.", op,
                  ": MOE_EXT_GROUPED_GEMM_ZERO must be \"memset\" or \"flags\", got \"", s, "\"");
  return std::strcmp(s, "memset") == 0;
}

}  // namespace

// The config by MOE_EXT_GROUPED_GEMM_TABLE (silu: MOE_EXT_GROUPED_GEMM_SILU_TABLE) for these shapes (as
// grouped_gemm_heuristic_config takes them; N is I for silu), or -1 when the variable is unset or the shapes have no
// bucket (the launcher's heuristic decides then).
int table_override_config(bool silu, int64_t rows, int64_t N, int64_t K, int64_t E, int64_t num_blocks,
                          int64_t block_size, int compute_capability, int num_sms) {
  const char* env = silu ? "MOE_EXT_GROUPED_GEMM_SILU_TABLE" : "MOE_EXT_GROUPED_GEMM_TABLE";
  const char* op = silu ? "moe_grouped_gemm_silu" : "moe_grouped_gemm";
  const char* s = std::getenv(env);
  if (s == nullptr || *s == '\0') return -1;
  const int buckets = cuda::grouped_gemm_num_buckets(silu);
  const int n = silu ? cuda::grouped_gemm_silu_num_configs() : cuda::grouped_gemm_num_configs();
  int table[64];
  int count = 0;
  const char* p = s;
  while (true) {
    char* end = nullptr;
    const long v = std::strtol(p, &end, 10);
    MOE_CHECK_VALUE(end != p && v >= 0 && v < n && count < buckets, "moe_ext.", op, ": ", env, " must be ", buckets,
                    " comma-separated configs in [0, ", n, "), got \"", s, "\"");
    table[count++] = static_cast<int>(v);
    if (*end == '\0') break;
    MOE_CHECK_VALUE(*end == ',', "moe_ext.", op, ": ", env, " must be ", buckets, " comma-separated configs, got \"",
                    s, "\"");
    p = end + 1;
  }
  MOE_CHECK_VALUE(count == buckets, "moe_ext.", op, ": ", env, " must be ", buckets,
                  " comma-separated configs, got ", count);
  const int bucket =
      cuda::grouped_gemm_heuristic_bucket(silu, rows, K, E, N, num_blocks, block_size, compute_capability, num_sms);
  return bucket < 0 ? -1 : table[bucket];
}

namespace {

// Limits of the launcher's int32 indexing and grid (N: output columns).
void check_launch_limits(const char* op, const at::Tensor& sorted_token_ids, int64_t N, int64_t max_n, int64_t K) {
  const int64_t P = sorted_token_ids.numel();
  MOE_CHECK_VALUE(P < (int64_t{1} << 31), "moe_ext.", op, ": sorted_token_ids has ", P,
                  " elements, more than int32 indices address");
  MOE_CHECK_VALUE(N <= max_n, "moe_ext.", op, ": the output's columns (N) must be at most ", max_n, ", got ", N);
  MOE_CHECK_VALUE(K < (int64_t{1} << 31), "moe_ext.", op, ": a.size(1) (K) must be below 2^31, got ", K);
}

// The output [rows, N] in a's dtype, zero-filled, or with `covered` [rows] uint8 zeroed for the
// launcher's flags path (then covered is defined and out is left uninitialized). zero_unwritten false:
// neither (the caller never reads the rows no block writes), so no memset and no zero pass runs.
at::Tensor alloc_output(const char* op, const at::Tensor& a, int64_t rows, int64_t N, bool zero_unwritten,
                        at::Tensor& covered) {
  if (!zero_unwritten) return at::empty({rows, N}, a.options());
  const bool zero_fill = zero_fill_output(op, rows * N * static_cast<int64_t>(a.element_size()));
  if (!zero_fill && rows > 0 && N > 0) covered = at::zeros({rows}, a.options().dtype(at::kByte));
  return zero_fill ? at::zeros({rows, N}, a.options()) : at::empty({rows, N}, a.options());
}

// Whether a device has mma.sync bf16/fp16 tensor cores (sm_80+).
bool has_tensor_cores(c10::DeviceIndex device) { return compute_capability(device) >= 80; }

// The config a launch forces (N is I for silu): MOE_EXT_GROUPED_GEMM[_SILU]_CONFIG, else the entry of
// MOE_EXT_GROUPED_GEMM[_SILU]_TABLE's table for the shapes; -1 leaves the choice to the launcher's heuristic.
int forced_config(bool silu, int64_t rows, int64_t N, int64_t K, int64_t E, const at::Tensor& sorted_token_ids,
                  int64_t num_blocks, c10::DeviceIndex device) {
  const int config = silu ? config_override("moe_grouped_gemm_silu", "MOE_EXT_GROUPED_GEMM_SILU_CONFIG",
                                            cuda::grouped_gemm_silu_num_configs())
                          : config_override("moe_grouped_gemm", "MOE_EXT_GROUPED_GEMM_CONFIG",
                                            cuda::grouped_gemm_num_configs());
  if (config >= 0 || rows == 0 || N == 0 || num_blocks == 0) return config;
  return table_override_config(silu, rows, N, K, E, num_blocks, sorted_token_ids.numel() / num_blocks,
                               compute_capability(device), num_sms(device));
}

}  // namespace

// a: [M, K]; w: [E, N, K]; sorted_token_ids: [num_blocks * block_size] int32; expert_ids:
// [num_blocks] int32; num_tokens_post_padded: [1] int32; topk_weights: optional fp32 with M * topk
// elements. Returns [M * topk, N] in a's dtype.
at::Tensor moe_grouped_gemm_cuda(const at::Tensor& a, const at::Tensor& w, const at::Tensor& sorted_token_ids,
                                 const at::Tensor& expert_ids, const at::Tensor& num_tokens_post_padded,
                                 int64_t topk, const std::optional<at::Tensor>& topk_weights, bool zero_unwritten) {
  constexpr const char* op = "moe_grouped_gemm";
  check_grouped_gemm_args(a, w, sorted_token_ids, expert_ids, num_tokens_post_padded, topk, topk_weights);
  const int64_t M = a.size(0), K = a.size(1), E = w.size(0), N = w.size(1);
  const int64_t rows = M * topk;
  const int64_t num_blocks = expert_ids.numel();
  check_launch_limits(op, sorted_token_ids, N, kMaxN, K);
  const c10::cuda::CUDAGuard guard(a.device());
  const c10::DeviceIndex device = a.device().index();
  const int config = forced_config(false, rows, N, K, E, sorted_token_ids, num_blocks, device);

  at::Tensor covered;  // [rows] uint8, set for each row a valid block writes (flags path only)
  auto out = alloc_output(op, a, rows, N, zero_unwritten, covered);
  if (rows == 0 || N == 0) return out;
  const float* tw = topk_weights.has_value() ? topk_weights->const_data_ptr<float>() : nullptr;
  C10_CUDA_CHECK(cuda::moe_grouped_gemm(
      to_dtype(a.scalar_type()), a.const_data_ptr(), w.const_data_ptr(), sorted_token_ids.const_data_ptr<int32_t>(),
      expert_ids.const_data_ptr<int32_t>(), num_tokens_post_padded.const_data_ptr<int32_t>(), tw, out.data_ptr(),
      covered.defined() ? covered.data_ptr<uint8_t>() : nullptr, M, topk, N, K, E, num_blocks,
      num_blocks == 0 ? 0 : sorted_token_ids.numel() / num_blocks, config, compute_capability(device), num_sms(device),
      c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor silu_and_mul_cuda(const at::Tensor& x);  // csrc/cuda/activation_cuda.cpp

// a: [M, K]; w13: [E, 2I, K] (gate rows, then up rows); the alignment triple as above. Returns
// [M * topk, I] in a's dtype.
at::Tensor moe_grouped_gemm_silu_cuda(const at::Tensor& a, const at::Tensor& w13, const at::Tensor& sorted_token_ids,
                                      const at::Tensor& expert_ids, const at::Tensor& num_tokens_post_padded,
                                      int64_t topk, bool zero_unwritten) {
  constexpr const char* op = "moe_grouped_gemm_silu";
  check_grouped_gemm_silu_args(a, w13, sorted_token_ids, expert_ids, num_tokens_post_padded, topk);
  const int64_t M = a.size(0), K = a.size(1), E = w13.size(0), I = w13.size(1) / 2;
  const int64_t rows = M * topk;
  const int64_t num_blocks = expert_ids.numel();
  check_launch_limits(op, sorted_token_ids, I, kMaxSiluI, K);
  const c10::cuda::CUDAGuard guard(a.device());
  const c10::DeviceIndex device = a.device().index();
  if (a.scalar_type() == at::kFloat || !has_tensor_cores(device)) {
    // No fused kernel off the tensor-core path: compose the two ops. fp32 loses nothing by it; bf16
    // and fp16 before sm_80 round the [M * topk, 2I] intermediate as the unfused layer does.
    return silu_and_mul_cuda(
        moe_grouped_gemm_cuda(a, w13, sorted_token_ids, expert_ids, num_tokens_post_padded, topk, std::nullopt,
                              zero_unwritten));
  }

  const int config = forced_config(true, rows, I, K, E, sorted_token_ids, num_blocks, device);

  at::Tensor covered;  // [rows] uint8, set for each row a valid block writes (flags path only)
  auto out = alloc_output(op, a, rows, I, zero_unwritten, covered);
  if (rows == 0 || I == 0) return out;
  C10_CUDA_CHECK(cuda::moe_grouped_gemm_silu(
      to_dtype(a.scalar_type()), a.const_data_ptr(), w13.const_data_ptr(), sorted_token_ids.const_data_ptr<int32_t>(),
      expert_ids.const_data_ptr<int32_t>(), num_tokens_post_padded.const_data_ptr<int32_t>(), out.data_ptr(),
      covered.defined() ? covered.data_ptr<uint8_t>() : nullptr, M, topk, I, K, E, num_blocks,
      num_blocks == 0 ? 0 : sorted_token_ids.numel() / num_blocks, config, compute_capability(device), num_sms(device),
      c10::cuda::getCurrentCUDAStream()));
  return out;
}

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("moe_grouped_gemm", &moe_grouped_gemm_cuda);
  m.impl("moe_grouped_gemm_silu", &moe_grouped_gemm_silu_cuda);
}

}  // namespace moe_ext
