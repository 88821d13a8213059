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

// acc[0, H) += scale * row, where row is H values of the combine dtype.
void Accumulate(const Layout& layout, const uint8_t* row, float scale, float* acc) {
  const int64_t H = layout.hidden;
  if (layout.combine_elem_bytes == 2) {
    const auto* v = reinterpret_cast<const uint16_t*>(row);
    for (int64_t h = 0; h < H; ++h) acc[h] += scale * Bf16ToFloat(v[h]);
  } else {
    const auto* v = reinterpret_cast<const float*>(row);
    for (int64_t h = 0; h < H; ++h) acc[h] += scale * v[h];
  }
}

void Store(const Layout& layout, const float* acc, uint8_t* row) {
  const int64_t H = layout.hidden;
  if (layout.combine_elem_bytes == 2) {
    auto* v = reinterpret_cast<uint16_t*>(row);
    for (int64_t h = 0; h < H; ++h) v[h] = FloatToBf16(acc[h]);
  } else {
    std::memcpy(row, acc, H * sizeof(float));
  }
}

}  // namespace

std::string CombineReduceHost(const Layout& layout, const void* expert_y, int64_t num_records,
                              const int32_t* record_rows, const float* record_weights,
                              uint8_t* partials) {
  const int k = layout.experts_per_token;
  const int64_t y_row_bytes = static_cast<int64_t>(layout.hidden) * layout.combine_elem_bytes;
  const auto* y = static_cast<const uint8_t*>(expert_y);
  std::vector<float> acc(layout.hidden);
  for (int64_t g = 0; g < num_records; ++g) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int i = 0; i < k; ++i) {
      const int32_t row = record_rows[g * k + i];
      if (row == -1) continue;
      if (row < -1 || row >= layout.max_recv_tokens) {
        return "record_rows[" + std::to_string(g) + ", " + std::to_string(i) + "] = " +
               std::to_string(row) + " is not a row of expert_y; pass the handle that dispatch " +
               "returned, unchanged.";
      }
      Accumulate(layout, y + row * y_row_bytes, record_weights[g * k + i], acc.data());
    }
    Store(layout, acc.data(), partials + g * layout.combine_row_bytes());
  }
  return {};
}

std::string CombineSumHost(const Layout& layout, const uint8_t* partials, int64_t num_partials,
                           const int32_t* send_index, int32_t num_tokens, void* out) {
  const int k = layout.experts_per_token;
  const int64_t out_row_bytes = static_cast<int64_t>(layout.hidden) * layout.combine_elem_bytes;
  auto* o = static_cast<uint8_t*>(out);
  std::vector<float> acc(layout.hidden);
  for (int64_t t = 0; t < num_tokens; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int i = 0; i < k; ++i) {
      const int32_t index = send_index[t * k + i];
      if (index == -1) continue;
      if (index < -1 || index >= num_partials) {
        return "send_index[" + std::to_string(t) + ", " + std::to_string(i) + "] = " +
               std::to_string(index) + " does not name a sent record; pass the handle that " +
               "dispatch returned, unchanged.";
      }
      Accumulate(layout, partials + index * layout.combine_row_bytes(), 1.0f, acc.data());
    }
    Store(layout, acc.data(), o + t * out_row_bytes);
  }
  std::memset(o + static_cast<int64_t>(num_tokens) * out_row_bytes, 0,
              (layout.max_tokens - static_cast<int64_t>(num_tokens)) * out_row_bytes);
  return {};
}

}  // namespace jem
