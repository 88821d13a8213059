// Host twins of the combine kernels: the weighted partial reduce on the expert side and the
// final sum on the home rank, both accumulating in float32.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "cc/kernels/bfloat16.h"
#include "cc/kernels/host_kernels.h"

namespace jem {
namespace {

// Channels summed in registers at a time: each output block is one pass over its input rows,
// with no float32 row buffer to re-read per input.
constexpr int64_t kBlock = 64;

inline float ToFloat(uint16_t bf16) { return Bf16ToFloat(bf16); }
inline float ToFloat(float f) { return f; }
inline void Store(float f, uint16_t* bf16) { *bf16 = FloatToBf16(f); }
inline void Store(float f, float* out) { *out = f; }

// out[h] = sum_j scales[j] * rows[j][h] for h in [0, H), accumulated in float32 from zero in
// the order of `rows`. Always inlined, so that each target clone below compiles it for its own
// instruction set.
template <typename T>
__attribute__((always_inline)) inline void WeightedSumOf(const T* const* rows,
                                                         const float* scales, int n, int64_t H,
                                                         T* out) {
  for (int64_t h0 = 0; h0 < H; h0 += kBlock) {
    const int64_t len = std::min(kBlock, H - h0);
    float acc[kBlock];
    for (int64_t h = 0; h < kBlock; ++h) acc[h] = 0.0f;
    for (int j = 0; j < n; ++j) {
      const T* v = rows[j] + h0;
      const float s = scales[j];
      if (len == kBlock) {
        for (int64_t h = 0; h < kBlock; ++h) acc[h] += s * ToFloat(v[h]);
      } else {
        for (int64_t h = 0; h < len; ++h) acc[h] += s * ToFloat(v[h]);
      }
    }
    for (int64_t h = 0; h < len; ++h) Store(acc[h], out + h0 + h);
  }
}

// Built for AVX2 (without FMA, so mul and add stay separately rounded and both builds give the
// same bits) and for the baseline; the loader picks one.
__attribute__((target_clones("avx2", "default")))
void WeightedSumBf16(const uint16_t* const* rows, const float* scales, int n, int64_t H,
                     uint16_t* out) {
  WeightedSumOf(rows, scales, n, H, out);
}

__attribute__((target_clones("avx2", "default")))
void WeightedSumF32(const float* const* rows, const float* scales, int n, int64_t H, float* out) {
  WeightedSumOf(rows, scales, n, H, out);
}

// The combine-dtype row `out` = sum_j scales[j] * rows[j], for n rows of the combine dtype.
void WeightedSum(const Layout& layout, const uint8_t* const* rows, const float* scales, int n,
                 uint8_t* out) {
  if (layout.combine_elem_bytes == 2) {
    WeightedSumBf16(reinterpret_cast<const uint16_t* const*>(rows), scales, n, layout.hidden,
                    reinterpret_cast<uint16_t*>(out));
  } else {
    WeightedSumF32(reinterpret_cast<const float* const*>(rows), scales, n, layout.hidden,
                   reinterpret_cast<float*>(out));
  }
}

}  // namespace

std::string CombineReduceHost(const Layout& layout, const void* expert_y, int64_t num_records,
                              const int32_t* record_rows, const float* record_weights,
                              uint8_t* partials) {
  const int k = layout.experts_per_token;
  const int64_t y_row_bytes = static_cast<int64_t>(layout.hidden) * layout.combine_elem_bytes;
  const auto* y = static_cast<const uint8_t*>(expert_y);
  std::vector<const uint8_t*> rows(k);
  std::vector<float> scales(k);
  for (int64_t g = 0; g < num_records; ++g) {
    int n = 0;
    for (int i = 0; i < k; ++i) {
      const int32_t row = record_rows[g * k + i];
      if (row == -1) continue;
      if (row < -1 || row >= layout.max_recv_tokens) {
        return "record_rows[" + std::to_string(g) + ", " + std::to_string(i) + "] = " +
               std::to_string(row) + " is not a row of expert_y; pass the handle that dispatch " +
               "returned, unchanged.";
      }
      rows[n] = y + row * y_row_bytes;
      scales[n++] = record_weights[g * k + i];
    }
    WeightedSum(layout, rows.data(), scales.data(), n, partials + g * layout.combine_row_bytes());
  }
  return {};
}

std::string CombineSumHost(const Layout& layout, const uint8_t* partials, int64_t num_partials,
                           const int32_t* send_index, int32_t num_tokens, void* out) {
  const int k = layout.experts_per_token;
  const int64_t out_row_bytes = static_cast<int64_t>(layout.hidden) * layout.combine_elem_bytes;
  auto* o = static_cast<uint8_t*>(out);
  std::vector<const uint8_t*> rows(k);
  const std::vector<float> ones(k, 1.0f);
  for (int64_t t = 0; t < num_tokens; ++t) {
    int n = 0;
    for (int i = 0; i < k; ++i) {
      const int32_t index = send_index[t * k + i];
      if (index == -1) continue;
      if (index < -1 || index >= num_partials) {
        return "send_index[" + std::to_string(t) + ", " + std::to_string(i) + "] = " +
               std::to_string(index) + " does not name a sent record; pass the handle that " +
               "dispatch returned, unchanged.";
      }
      rows[n++] = partials + index * layout.combine_row_bytes();
    }
    WeightedSum(layout, rows.data(), ones.data(), n, o + t * out_row_bytes);
  }
  std::memset(o + static_cast<int64_t>(num_tokens) * out_row_bytes, 0,
              (layout.max_tokens - static_cast<int64_t>(num_tokens)) * out_row_bytes);
  return {};
}

}  // namespace jem
