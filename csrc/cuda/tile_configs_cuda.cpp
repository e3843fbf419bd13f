// The sizes of the CUDA launchers' tile-config tables, for tuners and tests (they force each entry
// through the MOE_EXT_*_CONFIG overrides). No tensor arguments: registered as the op's
// CompositeExplicitAutograd kernel, which the dispatcher calls for any backend.
#include <torch/library.h>

#include <string>

#include "../core/validate.h"
#include "expert_gemv.h"
#include "grouped_gemm.h"

namespace moe_ext {

int64_t num_tile_configs(c10::string_view op) {
  if (op == "moe_grouped_gemm") return cuda::grouped_gemm_num_configs();
  if (op == "moe_grouped_gemm_silu") return cuda::grouped_gemm_silu_num_configs();
  if (op == "moe_gemv_silu") return cuda::moe_gemv_silu_num_configs();
  if (op == "moe_gemv_combine") return cuda::moe_gemv_combine_num_configs();
  MOE_CHECK_VALUE(false, "moe_ext.num_tile_configs: op must be moe_grouped_gemm, moe_grouped_gemm_silu, moe_gemv_silu "
                  "or moe_gemv_combine, got \"", std::string(op), "\"");
  return 0;
}

TORCH_LIBRARY_IMPL(moe_ext, CompositeExplicitAutograd, m) { m.impl("num_tile_configs", &num_tile_configs); }

}  // namespace moe_ext
