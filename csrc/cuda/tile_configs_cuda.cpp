// The sizes of the CUDA launchers' tile-config tables, for tuners and tests (they force each entry
// through the MOE_EXT_*_CONFIG overrides), the grouped-GEMM heuristics' pick for given shapes (with the
// MOE_EXT_GROUPED_GEMM[_SILU]_TABLE table where set) and their heuristic bucket. No
// tensor arguments: registered as the ops' CompositeExplicitAutograd kernels, which the dispatcher calls
// for any backend.
#include <torch/library.h>

#include <string>

#include "../core/validate.h"
#include "expert_gemv.h"
#include "grouped_gemm.h"

namespace moe_ext {

int table_override_config(bool silu, int64_t rows, int64_t N, int64_t K, int64_t E, int64_t num_blocks,
                          int64_t block_size, int compute_capability, int num_sms);  // csrc/cuda/grouped_gemm_cuda.cpp

int64_t num_tile_configs(c10::string_view op) {
  if (op == "moe_grouped_gemm") return cuda::grouped_gemm_num_configs();
  if (op == "moe_grouped_gemm_silu") return cuda::grouped_gemm_silu_num_configs();
  if (op == "moe_gemv_silu") return cuda::moe_gemv_silu_num_configs();
  if (op == "moe_gemv_combine") return cuda::moe_gemv_combine_num_configs();
  MOE_CHECK_VALUE(false, "moe_ext.num_tile_configs: op must be moe_grouped_gemm, moe_grouped_gemm_silu, moe_gemv_silu "
                  "or moe_gemv_combine, got \"", std::string(op), "\"");
  return 0;
}

namespace {

// The shape arguments of the two heuristic queries below (fn: the op's name for messages).
void check_tile_query(const char* fn, int64_t rows, int64_t N, int64_t K, int64_t num_experts, int64_t num_blocks,
                      int64_t block_size, int64_t compute_capability, int64_t num_sms) {
  MOE_CHECK_VALUE(rows >= 0 && N >= 0 && K >= 0 && num_experts >= 0 && num_blocks >= 0, "moe_ext.", fn,
                  ": rows, N, K, num_experts and num_blocks must be >= 0, got ", rows, ", ", N, ", ", K, ", ",
                  num_experts, ", ", num_blocks);
  MOE_CHECK_VALUE(block_size > 0 && num_sms > 0 && compute_capability > 0, "moe_ext.", fn,
                  ": block_size, compute_capability and num_sms must be positive, got ", block_size, ", ",
                  compute_capability, ", ", num_sms);
}

// Whether op names the SiLU-and-mul variant; fn: the query's name for the message naming the argument.
bool silu_op(const char* fn, c10::string_view op) {
  const bool silu = op == "moe_grouped_gemm_silu";
  MOE_CHECK_VALUE(silu || op == "moe_grouped_gemm", "moe_ext.", fn,
                  ": op must be moe_grouped_gemm or moe_grouped_gemm_silu, got \"", std::string(op), "\"");
  return silu;
}

}  // namespace

int64_t grouped_gemm_tile_config(c10::string_view op, int64_t rows, int64_t N, int64_t K, int64_t num_experts,
                                 int64_t num_blocks, int64_t block_size, int64_t compute_capability, int64_t num_sms) {
  const bool silu = silu_op("grouped_gemm_tile_config", op);
  check_tile_query("grouped_gemm_tile_config", rows, N, K, num_experts, num_blocks, block_size, compute_capability,
                   num_sms);
  // MOE_EXT_GROUPED_GEMM[_SILU]_TABLE, as the launch takes it
  const int cfg = table_override_config(silu, rows, N, K, num_experts, num_blocks, block_size,
                                        static_cast<int>(compute_capability), static_cast<int>(num_sms));
  if (cfg >= 0) return cfg;
  return cuda::grouped_gemm_heuristic_config(silu, rows, N, K, num_experts, num_blocks, block_size,
                                             static_cast<int>(compute_capability), static_cast<int>(num_sms));
}

int64_t grouped_gemm_tile_bucket(c10::string_view op, int64_t rows, int64_t N, int64_t K, int64_t num_experts,
                                 int64_t num_blocks, int64_t block_size, int64_t compute_capability, int64_t num_sms) {
  const bool silu = silu_op("grouped_gemm_tile_bucket", op);
  check_tile_query("grouped_gemm_tile_bucket", rows, N, K, num_experts, num_blocks, block_size, compute_capability,
                   num_sms);
  return cuda::grouped_gemm_heuristic_bucket(silu, rows, K, num_experts, N, num_blocks, block_size,
                                             static_cast<int>(compute_capability), static_cast<int>(num_sms));
}

TORCH_LIBRARY_IMPL(moe_ext, CompositeExplicitAutograd, m) {
  m.impl("num_tile_configs", &num_tile_configs);
  m.impl("grouped_gemm_tile_config", &grouped_gemm_tile_config);
  m.impl("grouped_gemm_tile_bucket", &grouped_gemm_tile_bucket);
}

}  // namespace moe_ext
