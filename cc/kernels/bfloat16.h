// bfloat16 <-> float32 for the host twins (the CUDA kernels use cuda_bf16.h): rounding to
// nearest even, NaN kept quiet, exactly what XLA and ml_dtypes do.
#pragma once

#include <cstdint>
#include <cstring>

namespace jem {

inline float Bf16ToFloat(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t FloatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace jem
