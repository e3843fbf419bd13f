// Element types crossing the adapter/launcher boundary, named without torch or CUDA headers.
#pragma once

namespace moe_ext {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace moe_ext
