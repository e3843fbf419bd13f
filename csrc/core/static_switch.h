// Turn runtime flags into template parameters (after flash-attention's static_switch.h):
//   BOOL_SWITCH(use_bias, kHasBias, [&] { launch<kHasBias>(...); });
#pragma once

#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()
