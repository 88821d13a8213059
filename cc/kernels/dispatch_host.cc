// Host twins of the dispatch kernels: count + pack on the sending rank, unpack on the
// receiving rank.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "cc/base/plan.h"
#include "cc/kernels/host_kernels.h"

namespace jem {
namespace {

// Whether slot i of a token is the first of its slots that routes to the same rank: the token
// travels once per rank, with the record owned by that slot.
bool FirstSlotForRank(const int32_t* ids, int i, int64_t local_experts) {
  const int64_t rank = ids[i] / local_experts;
  for (int j = 0; j < i; ++j) {
    if (ids[j] >= 0 && ids[j] / local_experts == rank) return false;
  }
  return true;
}

}  // namespace

std::string CheckDispatchInput(const Layout& layout, const DispatchInput& input) {
  if (input.num_tokens < 0 || input.num_tokens > layout.max_tokens) {
    return "num_tokens = " + std::to_string(input.num_tokens) +
           " is outside [0, max_tokens_per_rank = " + std::to_string(layout.max_tokens) + "].";
  }
  const int k = layout.experts_per_token;
  for (int64_t t = 0; t < input.num_tokens; ++t) {
    for (int i = 0; i < k; ++i) {
      const int32_t e = input.topk_ids[t * k + i];
      if (e < -1 || e >= layout.num_experts) {
        return "topk_ids[" + std::to_string(t) + ", " + std::to_string(i) + "] = " +
               std::to_string(e) + " is not an expert id: expected -1 (unused slot) or a value " +
               "in [0, num_experts = " + std::to_string(layout.num_experts) + ").";
      }
    }
  }
  return {};
}

void CountAndPackHost(const Layout& layout, const DispatchInput& input, int32_t* route_row,
                      uint8_t* send_records, int32_t* send_tokens, int32_t* send_index) {
  const int R = layout.num_ranks;
  const int k = layout.experts_per_token;
  const int64_t L = layout.local_experts();
  const int64_t entry = layout.route_entry_ints();
  std::fill(route_row, route_row + layout.route_row_ints(), 0);
  std::fill(send_index, send_index + static_cast<int64_t>(layout.max_tokens) * k, -1);

  // count
  for (int64_t t = 0; t < input.num_tokens; ++t) {
    const int32_t* ids = input.topk_ids + t * k;
    for (int i = 0; i < k; ++i) {
      if (ids[i] < 0) continue;
      int32_t* dest = route_row + (ids[i] / L) * entry;
      dest[1 + ids[i] % L] += 1;
      if (FirstSlotForRank(ids, i, L)) dest[0] += 1;
    }
  }
  std::vector<int64_t> cursor(R);
  for (int64_t d = 0, offset = 0; d < R; ++d) {
    send_tokens[d] = route_row[d * entry];
    cursor[d] = offset;
    offset += send_tokens[d];
  }

  // pack: chunk d holds the tokens for rank d in token order
  const int64_t x_bytes = layout.x_bytes();
  const int64_t num_scales = layout.num_scales();
  const int64_t record_bytes = layout.record_bytes();
  const int64_t used_bytes = layout.weight_offset() + 4 * k;
  const auto* x = static_cast<const uint8_t*>(input.x);
  for (int64_t t = 0; t < input.num_tokens; ++t) {
    const int32_t* ids = input.topk_ids + t * k;
    const float* weights = input.topk_weights + t * k;
    for (int i = 0; i < k; ++i) {
      if (ids[i] < 0 || !FirstSlotForRank(ids, i, L)) continue;
      const int64_t dest = ids[i] / L;
      const int64_t index = cursor[dest]++;
      send_index[t * k + i] = static_cast<int32_t>(index);
      uint8_t* record = send_records + index * record_bytes;
      std::memcpy(record, x + t * x_bytes, x_bytes);
      if (num_scales > 0) {
        std::memcpy(record + layout.scale_offset(), input.x_scale + t * num_scales,
                    num_scales * 4);
      }
      const int32_t src_token = static_cast<int32_t>(t);
      std::memcpy(record + layout.src_token_offset(), &src_token, 4);
      auto* local_expert = reinterpret_cast<int32_t*>(record + layout.expert_offset());
      auto* weight = reinterpret_cast<float*>(record + layout.weight_offset());
      for (int j = 0; j < k; ++j) {
        const bool here = ids[j] >= 0 && ids[j] / L == dest;
        local_expert[j] = here ? static_cast<int32_t>(ids[j] % L) : -1;
        weight[j] = here ? weights[j] : 0.0f;
      }
      std::memset(record + used_bytes, 0, record_bytes - used_bytes);
    }
  }
}

std::string UnpackHost(const Layout& layout, const uint8_t* arena, int rank,
                       const ExpertLayout& out) {
  const RouteTable route{reinterpret_cast<const int32_t*>(arena + layout.route_offset()), layout};
  const int R = layout.num_ranks;
  const int k = layout.experts_per_token;
  const int64_t L = layout.local_experts();
  const int64_t x_bytes = layout.x_bytes();
  const int64_t num_scales = layout.num_scales();
  auto* expert_x = static_cast<uint8_t*>(out.expert_x);
  if (route.recv_rows(rank) > layout.max_recv_tokens ||
      route.recv_records(rank) > layout.max_recv_records()) {
    return "the routing needs more rows than max_recv_tokens = " +
           std::to_string(layout.max_recv_tokens) + " on rank " + std::to_string(rank) + ".";
  }

  std::vector<int64_t> start(L), end(L), cursor(L);
  for (int64_t e = 0, row = 0; e < L; ++e) {
    out.expert_counts[e] = static_cast<int32_t>(route.expert_count(rank, e));
    out.group_sizes[e] = static_cast<int32_t>(route.group_size(rank, e));
    start[e] = cursor[e] = row;
    end[e] = row + out.expert_counts[e];
    row += out.group_sizes[e];
  }
  const int64_t num_records = layout.max_recv_records();
  std::fill(out.record_rows, out.record_rows + num_records * k, -1);
  std::fill(out.record_weights, out.record_weights + num_records * k, 0.0f);

  for (int s = 0; s < R; ++s) {
    const int64_t n = route.tokens(s, rank);
    out.recv_tokens[s] = static_cast<int32_t>(n);
    const int64_t base = route.recv_record_base(s, rank);
    const int64_t overflow_start = route.overflow_start(s, rank);
    for (int64_t j = 0; j < n; ++j) {
      const uint8_t* record = arena + layout.recv_record_offset(s, j, overflow_start);
      const auto* local_expert = reinterpret_cast<const int32_t*>(record + layout.expert_offset());
      const auto* weight = reinterpret_cast<const float*>(record + layout.weight_offset());
      const int64_t g = base + j;
      for (int i = 0; i < k; ++i) {
        const int32_t e = local_expert[i];
        if (e == -1) continue;
        if (e < -1 || e >= L || cursor[e] >= end[e]) {
          return "record " + std::to_string(j) + " from rank " + std::to_string(s) +
                 " disagrees with the route counts that rank sent (local expert " +
                 std::to_string(e) + "); the receive buffer holds inconsistent data.";
        }
        const int64_t row = cursor[e]++;
        std::memcpy(expert_x + row * x_bytes, record, x_bytes);
        if (num_scales > 0) {
          std::memcpy(out.expert_x_scale + row * num_scales, record + layout.scale_offset(),
                      num_scales * 4);
        }
        out.record_rows[g * k + i] = static_cast<int32_t>(row);
        out.record_weights[g * k + i] = weight[i];
      }
    }
  }

  // Padding rows of each group, then everything past the last group, are zero.
  for (int64_t e = 0; e < L; ++e) {
    if (cursor[e] != end[e]) {
      return "local expert " + std::to_string(e) + " received " +
             std::to_string(cursor[e] - start[e]) + " rows but the route counts announced " +
             std::to_string(end[e] - start[e]) + ".";
    }
    const int64_t group_end = start[e] + out.group_sizes[e];
    std::memset(expert_x + end[e] * x_bytes, 0, (group_end - end[e]) * x_bytes);
    if (num_scales > 0) {
      std::fill(out.expert_x_scale + end[e] * num_scales,
                out.expert_x_scale + group_end * num_scales, 0.0f);
    }
  }
  const int64_t used_rows = L > 0 ? start[L - 1] + out.group_sizes[L - 1] : 0;
  const int64_t rows = layout.max_recv_tokens;
  std::memset(expert_x + used_rows * x_bytes, 0, (rows - used_rows) * x_bytes);
  if (num_scales > 0) {
    std::fill(out.expert_x_scale + used_rows * num_scales, out.expert_x_scale + rows * num_scales,
              0.0f);
  }
  return {};
}

}  // namespace jem
