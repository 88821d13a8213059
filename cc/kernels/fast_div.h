// Division by a divisor fixed at set-up: one multiply-high, an add and a shift (Granlund and
// Montgomery's round-up method, as PyTorch's IntDivider uses it), exact for 0 <= x < 2^31.
// The kernels' index math divides by layout constants inside their copy loops, where a 32-bit
// division costs about 20 dependent instructions, and every copy of it (loops are unrolled)
// is code that each launch fetches again.
#pragma once

#include <cstdint>

#include "cc/base/layout.h"

namespace jem {

struct FastDiv {
  int32_t d = 1;
  uint32_t m = 1;  // 2^32 * (2^s - d) / d + 1
  uint32_t s = 0;  // ceil(log2(d))

  FastDiv() = default;
  // divisor in [1, 2^31).
  explicit FastDiv(int64_t divisor) : d(static_cast<int32_t>(divisor)) {
    while ((uint64_t{1} << s) < static_cast<uint64_t>(divisor)) ++s;
    m = static_cast<uint32_t>((uint64_t{1} << 32) * ((uint64_t{1} << s) - divisor) / divisor + 1);
  }

  JEM_HD int32_t Div(int32_t x) const {
    const auto ux = static_cast<uint32_t>(x);
#ifdef __CUDA_ARCH__
    const uint32_t hi = __umulhi(ux, m);
#else
    const auto hi = static_cast<uint32_t>((static_cast<uint64_t>(ux) * m) >> 32);
#endif
    return static_cast<int32_t>((hi + ux) >> s);  // hi <= x < 2^31: no overflow
  }
  JEM_HD int32_t Mod(int32_t x) const { return x - Div(x) * d; }
  // x rounded up to a multiple of d, for x + d - 1 < 2^31.
  JEM_HD int32_t RoundUp(int32_t x) const { return Div(x + d - 1) * d; }
};

}  // namespace jem
