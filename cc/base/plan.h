// The plan of one all-to-all step, computed from the route table (the full count matrix every
// rank holds after the route exchange, see layout.h): where each sender's records go, how many
// writes a receiver waits for, and whether the routing fits. Pure functions over the table, so
// that the host step, the CUDA kernels and the tests compute the same numbers.
#pragma once

#include <cstdint>

#include "cc/base/layout.h"

namespace jem {

// A view of the route table route[R][R][1 + L] at the start of an arena.
struct RouteTable {
  const int32_t* data = nullptr;
  Layout layout;

  JEM_HD const int32_t* entry(int64_t sender, int64_t dest) const {
    return data + sender * layout.route_row_ints() + dest * layout.route_entry_ints();
  }
  // Records (tokens) sender -> dest.
  JEM_HD int64_t tokens(int64_t sender, int64_t dest) const { return entry(sender, dest)[0]; }
  // Tokens sender -> dest's local expert e (a token counts once per slot naming e).
  JEM_HD int64_t expert_tokens(int64_t sender, int64_t dest, int64_t e) const {
    return entry(sender, dest)[1 + e];
  }
  // A sender that failed before packing says so in its first entry.
  JEM_HD bool sender_failed(int64_t sender) const { return entry(sender, 0)[0] == kRouteFailed; }

  // --- sender side ---
  // Index of sender's chunk for dest in sender's dispatch_send (and combine_recv).
  JEM_HD int64_t send_offset(int64_t sender, int64_t dest) const {
    int64_t offset = 0;
    for (int64_t d = 0; d < dest; ++d) offset += tokens(sender, d);
    return offset;
  }
  // Records of sender -> dest that go to the private slot, and the rest (overflow).
  JEM_HD int64_t private_count(int64_t sender, int64_t dest) const {
    return Min(tokens(sender, dest), layout.private_records());
  }
  JEM_HD int64_t overflow_count(int64_t sender, int64_t dest) const {
    return tokens(sender, dest) - private_count(sender, dest);
  }
  // Where sender's overflow records start in dest's overflow region.
  JEM_HD int64_t overflow_start(int64_t sender, int64_t dest) const {
    int64_t start = 0;
    for (int64_t s = 0; s < sender; ++s) start += overflow_count(s, dest);
    return start;
  }

  // --- receiver side ---
  // Records dest receives, and the number of the first one from sender (sender order).
  JEM_HD int64_t recv_records(int64_t dest) const {
    int64_t n = 0;
    for (int64_t s = 0; s < layout.num_ranks; ++s) n += tokens(s, dest);
    return n;
  }
  JEM_HD int64_t recv_record_base(int64_t sender, int64_t dest) const {
    int64_t base = 0;
    for (int64_t s = 0; s < sender; ++s) base += tokens(s, dest);
    return base;
  }
  // Rows of dest's local expert e in expert_x, before and after alignment padding.
  JEM_HD int64_t expert_count(int64_t dest, int64_t e) const {
    int64_t n = 0;
    for (int64_t s = 0; s < layout.num_ranks; ++s) n += expert_tokens(s, dest, e);
    return n;
  }
  JEM_HD int64_t group_size(int64_t dest, int64_t e) const {
    return AlignUp(expert_count(dest, e), layout.expert_alignment);
  }
  JEM_HD int64_t recv_rows(int64_t dest) const {
    int64_t rows = 0;
    for (int64_t e = 0; e < layout.local_experts(); ++e) rows += group_size(dest, e);
    return rows;
  }
  // Writes with kDispatchData that dest waits for: one private-slot write from every peer
  // (zero-length when it sends nothing) plus one overflow write from each peer that overflows.
  JEM_HD int64_t expected_dispatch_writes(int64_t dest) const {
    int64_t n = 0;
    for (int64_t s = 0; s < layout.num_ranks; ++s) {
      if (s != dest) n += 1 + (overflow_count(s, dest) > 0 ? 1 : 0);
    }
    return n;
  }
  // First rank whose routing does not fit its receive buffers, or -1. Every rank evaluates the
  // same table, so every rank reaches the same verdict.
  JEM_HD int64_t first_overfull_rank() const {
    for (int64_t d = 0; d < layout.num_ranks; ++d) {
      if (recv_rows(d) > layout.max_recv_tokens || recv_records(d) > layout.max_recv_records()) {
        return d;
      }
    }
    return -1;
  }
};

}  // namespace jem
