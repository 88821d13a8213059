// The GPU arena: what one rank allocates (cudaMalloc, once) and what its peers write into.
// Records and combine rows keep the formats of layout.h; only their placement differs from
// the CPU arena. Peers on the same node (NVLink) store into it directly; peers on other nodes
// reach it through the proxy thread and the fabric (cc/a2a/fabric_proxy.h), which writes the
// same bytes at the same offsets, so a receiving kernel cannot tell which way a record came.
//
// Every (sender, receiver) pair owns a fixed slot of T records (a sender never sends more
// than T records to one rank), so a sender never needs the other senders' counts before
// writing: the whole chunk goes at once (on the fabric this is the private slot of the CPU
// protocol made large enough that no overflow phase is ever needed). Capacity
// (max_recv_tokens) is still checked on every rank from the full route table, identically.
//
// Per rank, symmetric (same offsets on every rank):
//
//   signals     uint64 [5][R]  written by peers, each a step number (monotonic):
//                 dispatch_ready[s]   sender s has written all its records (and route row)
//                 dispatch_credit[d]  receiver d has consumed what this rank sent it
//                 combine_ready[d]    expert rank d has written all partials for this rank
//                 combine_credit[s]   home rank s has summed what this rank sent it
//                 dispatch_route[s]   sender s has written its route row (NVLink senders
//                                     raise it before their records, so that the receiver
//                                     folds the route table while they pack)
//               (for fabric peers the proxy raises them in a mapped host copy of this region)
//   state       this rank's own words: sticky error, step counters, block tickets
//   route       int32 [R][R][1 + L]  row s = sender s's whole plan: layout.h's route table,
//                 read through plan.h's RouteTable
//   slot_rank   int32 [R][T][k]  for record j of sender s, slot i: the slot's rank among the
//                 sender's slots naming the same expert, in (token, slot) order; the
//                 receiver turns it into an expert_x row without scanning other records
//   records     [R][T] dispatch records (layout.h format): sender s's record j at s * T + j
//   partials    [R][T] combine rows: expert rank d's partial of my record j at d * T + j
//   staging     [R] outboxes, one per destination d, each laid out like what this rank owns
//                 in d's arena: route row, slot ranks [T][k], records [T]. The staged
//                 dispatch_send packs NVLink peers' slot ranks and records here for the copy
//                 engine (their route rows it stores directly); the proxy writes fabric peers'
//                 whole outboxes with RDMA.
//   combine outboxes [R][T] combine rows: partials for fabric home rank d, row j at d * T + j
//
// A rank with fabric peers also has a fabric buffer laid out like this arena: the arena itself
// when the provider registers GPU memory (FI_HMEM), else a mapped pinned host mirror (staged):
// fabric peers' outboxes are packed there and their writes land there.
#pragma once

#include <cstdint>

#include "cc/base/layout.h"

namespace jem {

// Peers addressed by one context over NVLink: one node's GPUs.
constexpr int kMaxNvlinkRanks = 64;
// Tokens per rank and step on the NVLink path.
constexpr int kMaxNvlinkTokens = 16384;
// The kernels count slots per expert in shared memory, and divide expert ids by one multiply.
constexpr int kMaxNvlinkExperts = 4096;

// A rank's own words in its arena, touched only by its own kernels.
struct NvlinkState {
  uint32_t error;              // first error code of this rank (sticky), 0 = none
  uint32_t pad;
  uint64_t dispatch_step[2];   // [0] the last step received, [1] the last sent
  uint64_t combine_step[2];    // (a whole op's kernel may write both at its send's end)
  uint64_t ticket[4];          // blocks of the running kernel that finished, per kind
                               // (see NvlinkTicket)
  uint64_t staged_ready;       // the step a staged dispatch_send packed; the copy engine
                               // copies it into each peer's dispatch_ready flag after the data
};

// What a rank's kernels tell its proxy thread, in mapped pinned host memory: a step number per
// event, written last (release) after the counts it covers.
struct ProxyMailbox {
  uint64_t dispatch_sent;   // records of this step are packed in the fabric outboxes
  uint64_t dispatch_read;   // the records fabric senders wrote for this step are consumed
  uint64_t combine_sent;    // partials of this step are in the combine outboxes
  uint64_t combine_read;    // the partials fabric experts wrote for this step are summed
  int32_t dispatch_counts[kMaxNvlinkRanks];  // records per destination of dispatch_sent
  int32_t combine_counts[kMaxNvlinkRanks];   // partial rows per home rank of combine_sent
};

enum NvlinkTicket : int { kTicketDispatchSend, kTicketDispatchRecv, kTicketCombineSend,
                          kTicketCombineRecv };

struct NvlinkLayout {
  Layout layout;

  JEM_HD int64_t R() const { return layout.num_ranks; }
  JEM_HD int64_t T() const { return layout.max_tokens; }

  // --- signals ---
  JEM_HD int64_t signals_offset() const { return 0; }
  JEM_HD int64_t dispatch_ready_offset(int64_t sender) const {
    return signals_offset() + (0 * R() + sender) * 8;
  }
  JEM_HD int64_t dispatch_credit_offset(int64_t receiver) const {
    return signals_offset() + (1 * R() + receiver) * 8;
  }
  JEM_HD int64_t combine_ready_offset(int64_t expert_rank) const {
    return signals_offset() + (2 * R() + expert_rank) * 8;
  }
  JEM_HD int64_t combine_credit_offset(int64_t home_rank) const {
    return signals_offset() + (3 * R() + home_rank) * 8;
  }
  JEM_HD int64_t dispatch_route_offset(int64_t sender) const {
    return signals_offset() + (4 * R() + sender) * 8;
  }
  JEM_HD int64_t signals_bytes() const { return AlignUp(5 * R() * 8, 256); }

  // --- state ---
  JEM_HD int64_t state_offset() const { return signals_offset() + signals_bytes(); }
  JEM_HD int64_t state_bytes() const {
    return AlignUp(static_cast<int64_t>(sizeof(NvlinkState)), 256);
  }

  // --- route table: int32 [R][R][1 + L] ---
  JEM_HD int64_t route_entry_ints() const { return layout.route_entry_ints(); }
  JEM_HD int64_t route_row_ints() const { return layout.route_row_ints(); }
  JEM_HD int64_t route_offset() const { return state_offset() + state_bytes(); }
  JEM_HD int64_t route_row_offset(int64_t sender) const {
    return route_offset() + sender * route_row_ints() * 4;
  }
  JEM_HD int64_t route_bytes() const { return AlignUp(R() * route_row_ints() * 4, 256); }

  // --- slot ranks: int32 [R][T][k] ---
  JEM_HD int64_t slot_rank_offset() const { return route_offset() + route_bytes(); }
  JEM_HD int64_t slot_rank_record_offset(int64_t sender, int64_t index) const {
    return slot_rank_offset() + (sender * T() + index) * layout.experts_per_token * 4;
  }
  JEM_HD int64_t slot_rank_bytes() const {
    return AlignUp(R() * T() * layout.experts_per_token * 4, 256);
  }

  // --- records: [R][T] ---
  JEM_HD int64_t records_offset() const { return slot_rank_offset() + slot_rank_bytes(); }
  JEM_HD int64_t record_offset(int64_t sender, int64_t index) const {
    return records_offset() + (sender * T() + index) * layout.record_bytes();
  }
  JEM_HD int64_t records_bytes() const { return AlignUp(R() * T() * layout.record_bytes(), 256); }

  // --- combine partials: [R][T] ---
  JEM_HD int64_t partials_offset() const { return records_offset() + records_bytes(); }
  JEM_HD int64_t partial_offset(int64_t expert_rank, int64_t index) const {
    return partials_offset() + (expert_rank * T() + index) * layout.combine_row_bytes();
  }
  JEM_HD int64_t partials_bytes() const {
    return AlignUp(R() * T() * layout.combine_row_bytes(), 256);
  }

  // --- staging: [R] outboxes ---
  JEM_HD int64_t outbox_route_bytes() const { return AlignUp(route_row_ints() * 4, 256); }
  JEM_HD int64_t outbox_slot_rank_bytes() const {
    return AlignUp(T() * layout.experts_per_token * 4, 256);
  }
  JEM_HD int64_t outbox_records_bytes() const { return AlignUp(T() * layout.record_bytes(), 256); }
  JEM_HD int64_t outbox_bytes() const {
    return outbox_route_bytes() + outbox_slot_rank_bytes() + outbox_records_bytes();
  }
  JEM_HD int64_t staging_offset() const { return partials_offset() + partials_bytes(); }
  JEM_HD int64_t outbox_route_offset(int64_t dest) const {
    return staging_offset() + dest * outbox_bytes();
  }
  JEM_HD int64_t outbox_slot_rank_offset(int64_t dest, int64_t index) const {
    return outbox_route_offset(dest) + outbox_route_bytes() +
           index * layout.experts_per_token * 4;
  }
  JEM_HD int64_t outbox_record_offset(int64_t dest, int64_t index) const {
    return outbox_route_offset(dest) + outbox_route_bytes() + outbox_slot_rank_bytes() +
           index * layout.record_bytes();
  }

  // --- combine outboxes: [R][T] ---
  JEM_HD int64_t combine_outbox_offset(int64_t home_rank, int64_t index) const {
    return staging_offset() + R() * outbox_bytes() +
           (home_rank * T() + index) * layout.combine_row_bytes();
  }

  // --- proxy words: mapped pinned host memory of a rank with fabric peers: its ProxyMailbox,
  // then the flags the proxy raises for fabric peers, laid out like the signals region ---
  JEM_HD int64_t proxy_signals_offset() const {
    return AlignUp(static_cast<int64_t>(sizeof(ProxyMailbox)), 256);
  }
  JEM_HD int64_t proxy_words_bytes() const { return proxy_signals_offset() + signals_bytes(); }

  JEM_HD int64_t arena_bytes() const {
    return staging_offset() + R() * outbox_bytes() + partials_bytes();
  }
};

// One of NvlinkLayout's arrays as base + i * di + j * dj, read off NvlinkLayout itself (its
// offsets are affine in their indices): kernels index with a multiply-add of numbers set up
// once, instead of redoing the layout's 64-bit arithmetic, divisions included, at each access.
struct Affine {
  int64_t base = 0, di = 0, dj = 0;

  template <typename F>
  static Affine Of(F offset) {  // offset(i, j)
    const int64_t o = offset(0, 0);
    return Affine{o, offset(1, 0) - o, offset(0, 1) - o};
  }
  JEM_HD int64_t at(int64_t i, int64_t j = 0) const { return base + i * di + j * dj; }
};

// The arrays of an arena that kernels index, as Affine maps of NvlinkLayout's offsets.
struct ArenaOffsets {
  int64_t state = 0;
  Affine route_row;         // (sender)
  Affine slot_rank;         // (sender, index)
  Affine record;            // (sender, index)
  Affine partial;           // (expert_rank, index)
  Affine outbox_route;      // (dest)
  Affine outbox_slot_rank;  // (dest, index)
  Affine outbox_record;     // (dest, index)
  Affine combine_outbox;    // (home_rank, index)

  ArenaOffsets() = default;
  explicit ArenaOffsets(const NvlinkLayout& nl)
      : state(nl.state_offset()),
        route_row(Affine::Of([&](int64_t i, int64_t) { return nl.route_row_offset(i); })),
        slot_rank(Affine::Of([&](int64_t i, int64_t j) { return nl.slot_rank_record_offset(i, j); })),
        record(Affine::Of([&](int64_t i, int64_t j) { return nl.record_offset(i, j); })),
        partial(Affine::Of([&](int64_t i, int64_t j) { return nl.partial_offset(i, j); })),
        outbox_route(Affine::Of([&](int64_t i, int64_t) { return nl.outbox_route_offset(i); })),
        outbox_slot_rank(
            Affine::Of([&](int64_t i, int64_t j) { return nl.outbox_slot_rank_offset(i, j); })),
        outbox_record(
            Affine::Of([&](int64_t i, int64_t j) { return nl.outbox_record_offset(i, j); })),
        combine_outbox(
            Affine::Of([&](int64_t i, int64_t j) { return nl.combine_outbox_offset(i, j); })) {}
};

}  // namespace jem
