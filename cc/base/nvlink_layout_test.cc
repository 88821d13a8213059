// ArenaOffsets against NvlinkLayout: for random layouts, every array the kernels index through
// an Affine map gives NvlinkLayout's own offset at random indices (and at the corners); and
// every flag of the signals region has a word of its own, inside the region.
#include <cstdint>
#include <cstdio>
#include <random>
#include <set>

#include "cc/base/nvlink_layout.h"

int main() {
  std::mt19937_64 rng(std::random_device{}());
  auto pick = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  int64_t checks = 0, failures = 0;
  auto check = [&](const char* what, int64_t got, int64_t want) {
    ++checks;
    if (got != want && ++failures <= 10) {
      std::fprintf(stderr, "%s: %lld, NvlinkLayout says %lld\n", what,
                   static_cast<long long>(got), static_cast<long long>(want));
    }
  };
  for (int n = 0; n < 2000; ++n) {
    jem::Layout l;
    l.num_ranks = static_cast<int32_t>(pick(1, 64));
    l.num_experts = l.num_ranks * static_cast<int32_t>(pick(1, 16));
    l.experts_per_token = static_cast<int32_t>(pick(1, 16));
    l.hidden = 128 * static_cast<int32_t>(pick(1, 64));
    l.max_tokens = static_cast<int32_t>(pick(1, 8192));
    l.max_recv_tokens = static_cast<int32_t>(pick(1, 1 << 16));
    l.expert_alignment = static_cast<int32_t>(pick(1, 128));
    l.dispatch_elem_bytes = static_cast<int32_t>(1 << pick(0, 2));
    l.combine_elem_bytes = static_cast<int32_t>(2 << pick(0, 1));
    l.has_scales = l.dispatch_elem_bytes == 1;
    const jem::NvlinkLayout nl{l};
    const jem::ArenaOffsets off(nl);
    check("state", off.state, nl.state_offset());
    std::set<int64_t> flags;
    for (int64_t p = 0; p < l.num_ranks; ++p) {
      for (int64_t f : {nl.dispatch_ready_offset(p), nl.dispatch_credit_offset(p),
                        nl.combine_ready_offset(p), nl.combine_credit_offset(p),
                        nl.dispatch_route_offset(p)}) {
        check("flag inside the signals region", f >= 0 && f + 8 <= nl.signals_bytes(), true);
        check("flag aligned", f % 8, 0);
        flags.insert(f);
      }
    }
    check("distinct flags", static_cast<int64_t>(flags.size()), 5 * l.num_ranks);
    check("signals before state", nl.signals_bytes() <= nl.state_offset(), true);
    for (int i = 0; i < 20; ++i) {
      const int64_t r = i == 0 ? 0 : i == 1 ? l.num_ranks - 1 : pick(0, l.num_ranks - 1);
      const int64_t t = i == 0 ? 0 : i == 1 ? l.max_tokens - 1 : pick(0, l.max_tokens - 1);
      check("route_row", off.route_row.at(r), nl.route_row_offset(r));
      check("slot_rank", off.slot_rank.at(r, t), nl.slot_rank_record_offset(r, t));
      check("record", off.record.at(r, t), nl.record_offset(r, t));
      check("partial", off.partial.at(r, t), nl.partial_offset(r, t));
      check("outbox_route", off.outbox_route.at(r), nl.outbox_route_offset(r));
      check("outbox_slot_rank", off.outbox_slot_rank.at(r, t), nl.outbox_slot_rank_offset(r, t));
      check("outbox_record", off.outbox_record.at(r, t), nl.outbox_record_offset(r, t));
      check("combine_outbox", off.combine_outbox.at(r, t), nl.combine_outbox_offset(r, t));
    }
  }
  std::printf("%lld checks, %lld failures\n", static_cast<long long>(checks),
              static_cast<long long>(failures));
  return failures == 0 ? 0 : 1;
}
