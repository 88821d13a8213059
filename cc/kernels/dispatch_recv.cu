// dispatch, recv half: wait for every sender's ready flag, check the routing against the
// buffers (every rank checks every rank, from the same route table, so all agree), then expand
// each received record into the rows of its local experts: expert_x is grouped by local
// expert, rows within an expert ordered by (sender, record, slot), padding rows zero. Finally
// give every sender the credit to reuse its slot here.
//
// Every block derives the expert offsets from the route table itself (one parallel pass of
// loads into shared memory); the row of each slot is expert start + the rows of earlier
// senders + the slot rank the sender computed, so blocks own contiguous record ranges and
// never wait for each other. A block expands its range in pieces of at most the full grid's
// share (one piece unless an SM budget shrank the grid).
#include "cc/kernels/device_utils.cuh"
#include "cc/kernels/launch.cuh"
#include "cc/kernels/nvlink_kernels.h"

namespace jem {
namespace {

using namespace device;

// A piece is the records a block expands at a time.
__host__ __device__ inline Plan PlanRecv(const Layout& lay, int full_grid) {
  Plan p;
  p.piece = CeilDiv(lay.max_recv_records(), full_grid);
  const int64_t R = lay.num_ranks, L = lay.local_experts(), k = lay.experts_per_token;
  p.shared_bytes = 8 * p.piece +                     // record pointers
                   4 * (8 +                          // verdicts
                        2 * R + (R + 1) +            // rows and records needed, record bases
                        R * R + 2 * R * L +          // the route table, folded
                        5 * (L + 1) +                // count, group, pad, expert and pad starts
                        R * L +                      // rows of earlier senders per expert
                        p.piece * k);                // rows of this piece's slots
  return p;
}

// Index of the last i in [0, n) with starts[i] <= x (starts nondecreasing, starts[0] <= x).
__device__ __forceinline__ int64_t UpperIndex(const int32_t* starts, int64_t n, int64_t x) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (starts[mid] <= x) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__global__ void __launch_bounds__(kThreads, 2)
    DispatchRecvKernel(const __grid_constant__ NvlinkArgs a, const DispatchRecvIo io) {
  const Layout& lay = a.layout;
  const int R = lay.num_ranks, k = lay.experts_per_token;
  const int L = static_cast<int>(lay.local_experts());
  const int64_t M = lay.max_recv_tokens, N = lay.max_recv_records();
  const Arena me = ArenaOf(a, a.rank);
  NvlinkState* st = me.state();
  const Plan plan = PlanRecv(lay, FullGrid(a));
  const int tid = threadIdx.x;
  const int64_t gtid = static_cast<int64_t>(blockIdx.x) * kThreads + tid;
  const int64_t gthreads = static_cast<int64_t>(gridDim.x) * kThreads;

  const bool in_turn = InTurn(a, st->dispatch_step, /*send=*/false, StepPhase::kDispatch);
  const uint64_t step = st->dispatch_step[1];

  extern __shared__ __align__(16) uint8_t smem[];
  // [piece] where each record of this piece is: the offset math stays out of the copy
  // loops, which keeps them short.
  auto** s_recs = reinterpret_cast<const uint8_t**>(smem);
  int32_t* s_verdict = reinterpret_cast<int32_t*>(s_recs + plan.piece);  // [8]
  int32_t* s_need_rows = s_verdict + 8;                    // [R]
  int32_t* s_need_recs = s_need_rows + R;                  // [R]
  int32_t* s_rbase = s_need_recs + R;                      // [R + 1] first record per sender
  int32_t* s_tok = s_rbase + R + 1;                        // [R][R] records sender -> dest
  int32_t* s_col = s_tok + R * R;                          // [R][L] slots per (dest, expert)
  int32_t* s_own = s_col + R * L;                          // [R][L] slots sender -> my experts
  int32_t* s_count = s_own + R * L;                        // [L] rows per local expert
  int32_t* s_group = s_count + L + 1;                      // [L] rows with padding
  int32_t* s_pad = s_group + L + 1;                        // [L] padding rows
  int32_t* s_estart = s_pad + L + 1;                       // [L + 1] first row per expert
  int32_t* s_pstart = s_estart + L + 1;                    // [L + 1] first padding row
  int32_t* s_sbase = s_pstart + L + 1;                     // [R][L] rows of earlier senders
  int32_t* s_rows = s_sbase + R * L;                       // [piece][k]

  if (tid == 0) {
    s_verdict[0] = INT32_MAX;
    s_verdict[1] = INT32_MAX;
  }
  for (int i = tid; i < 2 * R; i += kThreads) s_need_rows[i] = 0;  // and s_need_recs
  for (int i = tid; i < R * L; i += kThreads) s_col[i] = 0;
  const bool arrived = in_turn && WaitPeers(a, DeviceWait::kDispatchReady, step);

  // The route table route[R][R][1 + L] (layout.h) folded in one pass: records per (sender,
  // dest), slots per (dest, expert) over all senders, and this rank's column per sender.
  if (arrived) {
    const int entry = static_cast<int>(me.nl.route_entry_ints());
    const int row = static_cast<int>(me.nl.route_row_ints());
    for (int x = tid; x < R * row; x += kThreads) {
      const int src = x / row, d = x % row / entry, j = x % entry;
      const int32_t v = InboxOf(a, src).route_row(src)[x % row];
      if (j == 0) {
        s_tok[src * R + d] = v;
        if (d == 0 && v == kRouteFailed) atomicMin(&s_verdict[0], src);
      } else {
        atomicAdd(&s_col[d * L + j - 1], v);
        if (d == a.rank) s_own[src * L + j - 1] = v;
      }
    }
    __syncthreads();
    for (int x = tid; x < R * L; x += kThreads) {
      atomicAdd(&s_need_rows[x / L], static_cast<int32_t>(AlignUp(s_col[x], lay.expert_alignment)));
    }
    for (int d = tid; d < R; d += kThreads) {
      int32_t n = 0;
      for (int src = 0; src < R; ++src) n += s_tok[src * R + d];
      s_need_recs[d] = n;
    }
    __syncthreads();
    if (tid == 0) {
      for (int d = R - 1; d >= 0; --d) {
        if (s_need_rows[d] > M || s_need_recs[d] > N) s_verdict[1] = d;
      }
    }
  }
  __syncthreads();
  const int failed_sender = s_verdict[0] == INT32_MAX ? -1 : s_verdict[0];
  const int full_rank = s_verdict[1] == INT32_MAX ? -1 : s_verdict[1];
  const bool good = arrived && failed_sender < 0 && full_rank < 0;
  if (blockIdx.x == 0 && tid == 0) {
    if (arrived && failed_sender >= 0) {
      SetError(a, DeviceError::kPeerFailed, failed_sender, 0, 0);
    } else if (arrived && full_rank >= 0) {
      SetError(a, DeviceError::kCapacity, full_rank, s_need_rows[full_rank],
               s_need_recs[full_rank]);
    }
  }

  if (!good) {
    // A failed step still leaves the small outputs defined.
    for (int64_t x = gtid; x < N * k; x += gthreads) {
      io.record_rows[x] = -1;
      io.record_weights[x] = 0.0f;
    }
    if (blockIdx.x == 0) {
      for (int e = tid; e < L; e += kThreads) io.expert_counts[e] = io.group_sizes[e] = 0;
      for (int s = tid; s < R; s += kThreads) io.recv_tokens[s] = io.home_offsets[s] = 0;
    }
  } else {
    // Expert starts and the rows of earlier senders, per local expert.
    for (int e = tid; e < L; e += kThreads) {
      int32_t n = 0;
      for (int src = 0; src < R; ++src) {
        s_sbase[src * L + e] = n;
        n += s_own[src * L + e];
      }
      s_count[e] = n;
      s_group[e] = static_cast<int32_t>(AlignUp(n, lay.expert_alignment));
      s_pad[e] = s_group[e] - n;
    }
    __syncthreads();
    const int warp = tid >> 5;
    if (warp == 0) {
      const int64_t total = WarpExclusiveScan(s_group, s_estart, L);
      if ((tid & 31) == 0) s_estart[L] = static_cast<int32_t>(total);
    } else if (warp == 1) {
      const int64_t total = WarpExclusiveScan(s_pad, s_pstart, L);
      if ((tid & 31) == 0) s_pstart[L] = static_cast<int32_t>(total);
    } else if (tid == 64) {
      int32_t n = 0;
      for (int src = 0; src < R; ++src) {
        s_rbase[src] = n;
        n += s_tok[src * R + a.rank];
      }
      s_rbase[R] = n;
    }
    __syncthreads();
    const int64_t total = s_rbase[R];
    if (blockIdx.x == 0) {
      for (int e = tid; e < L; e += kThreads) {
        io.expert_counts[e] = s_count[e];
        io.group_sizes[e] = s_group[e];
      }
      for (int src = tid; src < R; src += kThreads) {
        io.recv_tokens[src] = s_rbase[src + 1] - s_rbase[src];
        int32_t offset = 0;
        for (int d = 0; d < a.rank; ++d) offset += s_tok[src * R + d];
        io.home_offsets[src] = offset;
      }
    }

    // This block's records [g0, g1), a piece at a time: the row of every slot, then the copies.
    const int per_block = static_cast<int>(CeilDiv(total, gridDim.x));
    const int g0 = static_cast<int>(Min(total, blockIdx.x * per_block));
    const int g1 = static_cast<int>(Min(total, g0 + per_block));
    const int piece = static_cast<int>(plan.piece);
    const int x_vecs = static_cast<int>(lay.x_bytes() / 16);
    const int S = static_cast<int>(lay.num_scales());
    auto* expert_x = static_cast<uint8_t*>(io.expert_x);
    for (int p0 = g0; p0 < g1; p0 += piece) {
      const int nrec = Min(p0 + piece, g1) - p0;
      for (int x = tid; x < nrec * k; x += kThreads) {
        const int g = p0 + x / k, i = x % k;
        const int s = static_cast<int>(UpperIndex(s_rbase, R, g));
        const int j = g - s_rbase[s];
        const uint8_t* rec = InboxOf(a, s).record(s, j);
        if (i == 0) s_recs[x / k] = rec;
        const int32_t e = reinterpret_cast<const int32_t*>(rec + lay.expert_offset())[i];
        const float w = reinterpret_cast<const float*>(rec + lay.weight_offset())[i];
        const int32_t rank = InboxOf(a, s).slot_rank(s, j)[i];
        int32_t row = -1;
        if (e != -1) {
          const bool sane = e >= 0 && e < L && rank >= 0 && rank < s_own[s * L + e];
          if (sane) {
            row = s_estart[e] + s_sbase[s * L + e] + rank;
          } else {
            SetError(a, DeviceError::kCorrupt, s, j, i);
          }
        }
        s_rows[x] = row;
        io.record_rows[static_cast<int64_t>(g) * k + i] = row;
        io.record_weights[static_cast<int64_t>(g) * k + i] = row >= 0 ? w : 0.0f;
      }
      __syncthreads();

      // Expand: each 16-byte vector of a record is loaded once and stored to each of its rows.
      Batched<4>(
          tid, nrec * x_vecs, [&](int w) { return Load16(s_recs[w / x_vecs] + (w % x_vecs) * 16); },
          [&](int w, int4 v) {
            const int r = w / x_vecs, c = w % x_vecs;
            for (int i = 0; i < k; ++i) {
              const int32_t row = s_rows[r * k + i];
              if (row >= 0) Store16(expert_x + row * lay.x_bytes() + c * 16, v);
            }
          });
      for (int w = tid; w < nrec * S; w += kThreads) {
        const int r = w / S, c = w % S;
        const float scale = reinterpret_cast<const float*>(s_recs[r] + lay.scale_offset())[c];
        for (int i = 0; i < k; ++i) {
          const int32_t row = s_rows[r * k + i];
          if (row >= 0) io.expert_x_scale[static_cast<int64_t>(row) * S + c] = scale;
        }
      }
      if (p0 + piece < g1) __syncthreads();  // the next piece rewrites what the copies read
    }

    // Handle entries past the last record.
    for (int64_t x = total * k + gtid; x < N * k; x += gthreads) {
      io.record_rows[x] = -1;
      io.record_weights[x] = 0.0f;
    }

    // Zero rows: padding of each group, then (optionally) everything past the last group.
    const int64_t pad_rows = s_pstart[L];
    const int64_t used_rows = s_estart[L];
    const int64_t zero_rows = pad_rows + (a.zero_unused_rows ? M - used_rows : 0);
    const int4 zero = make_int4(0, 0, 0, 0);
    for (int64_t w = gtid; w < zero_rows * (x_vecs + S); w += gthreads) {
      const int64_t z = w / (x_vecs + S), c = w % (x_vecs + S);
      int64_t row;
      if (z < pad_rows) {
        const int64_t e = UpperIndex(s_pstart, L, z);
        row = s_estart[e] + s_count[e] + (z - s_pstart[e]);
      } else {
        row = used_rows + (z - pad_rows);
      }
      if (c < x_vecs) {
        Store16(expert_x + row * lay.x_bytes() + c * 16, zero);
      } else {
        io.expert_x_scale[row * S + (c - x_vecs)] = 0.0f;
      }
    }
  }

  if (in_turn) {
    EndRecv(a, kTicketDispatchRecv, st->dispatch_step, DeviceWait::kDispatchCredit,
            &a.mailbox->dispatch_read, step);
  }
}

}  // namespace

void LoadDispatchRecv(const NvlinkArgs& args) {
  LoadKernels("loading dispatch_recv", PlanRecv(args.layout, FullGrid(args)).shared_bytes,
              DispatchRecvKernel);
}

void LaunchDispatchRecv(const NvlinkArgs& args, const DispatchRecvIo& io, cudaStream_t stream) {
  LaunchKernel("launching dispatch_recv", DispatchRecvKernel, GridOf(args, FullGrid(args)),
               PlanRecv(args.layout, FullGrid(args)).shared_bytes, stream, args, io);
}

}  // namespace jem
