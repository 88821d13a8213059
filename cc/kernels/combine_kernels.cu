// The combine kernels: the send half, the recv half, and the whole op as one kernel of both
// (see dispatch_kernels.cu).
//
// Send half (expert side): for each received record, the weighted sum of its expert
// output rows (float32 accumulation), stored once in the combine dtype straight into the home
// rank's partial slot (over NVLink for peers; into the combine outbox for fabric home ranks,
// which the proxy writes); then raise this rank's ready flag at every NVLink home rank and
// tell the proxy. Before writing, wait for each home rank's credit for the previous combine.
// Blocks take pieces of a full grid's share of the records (one piece each unless an SM
// budget shrank the grid); with fewer records than blocks (decode), parts of records, so that
// more blocks share the reads.
//
// Recv half (home side): wait for every expert rank's ready flag, then sum, for each
// token, the partials its records came back with (float32 accumulation); every expert rank
// gets the credit to reuse its partial slot here as in dispatch. Rows at or past num_tokens
// are zero.
// Blocks own contiguous token ranges, which they sum in pieces of at most the full grid's share
// (one piece unless an SM budget shrank the grid).
//
// Loops outside the copies carry `#pragma unroll 1`: at decode sizes each runs once or a few
// times per thread, and unrolled copies of them only grow the code that every launch fetches
// again (stalls on instruction fetch were a quarter of the fused dispatch's time at T=1).
#include <algorithm>

#include "cc/kernels/device_utils.cuh"
#include "cc/kernels/launch.cuh"
#include "cc/kernels/nvlink_kernels.h"

namespace jem {
namespace {

using namespace device;

// Records a block sums at a time.
__host__ __device__ inline int64_t PieceRecords(const Layout& lay, int full_grid) {
  return CeilDiv32(static_cast<int32_t>(lay.max_recv_records()), full_grid);
}

__host__ __device__ inline int64_t SendSharedBytes(const Layout& lay, int full_grid) {
  const int64_t R = lay.num_ranks, k = lay.experts_per_token;
  return 4 * (4 + (R + 1)) + PieceRecords(lay, full_grid) * k * 8;
}

// The send half of `step` (in_turn: the halves' order allows it), by every block of the grid;
// returns (to every thread) whether this block was the last past the ticket. whole: the whole
// op's kernel, whose blocks are all resident.
template <typename T>
__device__ __forceinline__ bool SendBlocks(const NvlinkArgs& a, const CombineSendIo& io,
                                           bool in_turn, uint64_t step, bool whole) {
  const Layout& lay = a.layout;
  const int R = lay.num_ranks, k = lay.experts_per_token;
  const int64_t M = lay.max_recv_tokens, N = lay.max_recv_records(), T_max = lay.max_tokens;
  const Arena me = ArenaOf(a, a.rank);
  NvlinkState* st = me.state();
  const int tid = threadIdx.x;
  Stamp(a, kCombineStart);

  extern __shared__ __align__(16) uint8_t smem[];
  const int piece = static_cast<int>(PieceRecords(lay, FullGrid(a)));
  float* s_weight = reinterpret_cast<float*>(smem);                    // [piece][k]
  int32_t* s_row = reinterpret_cast<int32_t*>(s_weight + piece * k);  // [piece][k]
  int32_t* s_bad = s_row + piece * k;                                  // [4]
  int32_t* s_rbase = s_bad + 4;                                        // [R + 1]

  // The home ranks may reuse what they received last step only once they said so: the
  // block's last threads wait for the credits while the others read the handle.
  const int waiter = tid - (kThreads - R);
  bool credited = in_turn;
  if (in_turn && waiter >= 0) {
    credited = WaitFlag(a, FlagOf(a, DeviceWait::kCombineCredit, waiter), step - 1,
                        DeviceWait::kCombineCredit, waiter);
  }
#pragma unroll 1
  for (int src = tid; src < R; src += kThreads) s_rbase[src + 1] = io.recv_tokens[src];
  __syncthreads();
  if (tid == 0) {
    int32_t n = 0;
    s_bad[0] = -1;
#pragma unroll 1
    for (int src = 0; src < R; ++src) {
      const int32_t v = s_rbase[src + 1];
      if ((v < 0 || v > T_max || n + v > N) && s_bad[0] < 0) {
        s_bad[0] = src;
        s_bad[1] = v;
      }
      s_rbase[src] = n;
      n += (v < 0 || v > T_max) ? 0 : v;
    }
    s_rbase[R] = Min(n, N);
  }
  __syncthreads();

  // Pieces of a full grid's share, block b taking pieces b, b + grid, ...: whole records, or
  // where there are fewer records than the full grid has blocks (decode), a part of one (a
  // range of its vectors, PartsPerRecord), so that more blocks share the work. The rows and
  // weights of a piece's slots are own data: the first piece's are read before the credits
  // are checked.
  const int vecs = static_cast<int>(lay.combine_row_bytes() / 16);
  const int64_t total = in_turn && s_bad[0] < 0 ? s_rbase[R] : 0;
  const int parts = PartsPerRecord(total, vecs, FullGrid(a));
  const int64_t units = total * parts;  // (record, part)
  const int64_t share = CeilDiv(units, FullGrid(a));  // 1 where parts > 1
  // The piece from unit u0: its first record, part and records.
  struct Piece {
    int p0, q, nrec;
  };
  const auto piece_at = [&](int64_t u0) {
    const int p0 = static_cast<int>(u0 / parts);
    return Piece{p0, static_cast<int>(u0 - int64_t{p0} * parts),
                 static_cast<int>(Min(share, units - u0)) / parts + (parts > 1)};
  };
  const auto read_slots = [&](const Piece& p) {
#pragma unroll 1
    for (int x = tid; x < p.nrec * k; x += kThreads) {
      const int64_t at = static_cast<int64_t>(p.p0) * k + x;
      const int32_t row = io.record_rows[at];
      const float weight = io.record_weights[at];  // loaded with the row, not after it
      if (row < -1 || row >= M) {
        SetError(a, DeviceError::kBadHandle, static_cast<int64_t>(HandleOperand::kRecordRows),
                 at, row);
      }
      const bool use = row >= 0 && row < M;
      s_row[x] = use ? row : -1;
      s_weight[x] = use ? weight : 0.0f;
    }
  };
  const int64_t first = blockIdx.x * share;
  if (first < units) read_slots(piece_at(first));

  const bool ok = in_turn && __syncthreads_and(credited) != 0;
  Stamp(a, kCombineCredited);
  const bool good = ok && s_bad[0] < 0;
  if (blockIdx.x == 0 && tid == 0 && ok && !good) {
    SetError(a, DeviceError::kBadHandle, static_cast<int64_t>(HandleOperand::kRecvTokens),
             s_bad[0], s_bad[1]);
  }
  if (blockIdx.x == 0 && io.sent != nullptr) {
#pragma unroll 1
    for (int src = tid; src < R; src += kThreads) io.sent[src] = good ? io.recv_tokens[src] : 0;
  }

  // One 16-byte vector of the partial per item: up to k loads in flight, then one store. More
  // than one record: whole ones.
  const int64_t y_row_bytes = static_cast<int64_t>(lay.hidden) * sizeof(T);
  const auto* y = static_cast<const uint8_t*>(io.expert_y);
#pragma unroll 1
  for (int64_t u0 = first; good && u0 < units; u0 += gridDim.x * share) {
    const Piece p = piece_at(u0);
    if (u0 != first) {
      __syncthreads();  // the last piece's sums are done with its slots
      read_slots(p);
      __syncthreads();
    }
    const int vlo = p.q * vecs / parts, vn = (p.q + 1) * vecs / parts - vlo;
    for (int w = tid; w < p.nrec * vn; w += kThreads) {
      const int r = p.nrec == 1 ? 0 : a.div.combine_vecs.Div(w), c = vlo + w - r * vn;
      const int g = p.p0 + r;
      float acc[Vec16<T>::kLanes] = {};
      for (int i0 = 0; i0 < k; i0 += 4) {
        int4 v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int i = i0 + u;
          if (i < k && s_row[r * k + i] >= 0) {
            v[u] = LoadInput16(y + s_row[r * k + i] * y_row_bytes + c * 16);
          }
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int i = i0 + u;
          if (i < k && s_row[r * k + i] >= 0) {
            Vec16<T>::Accumulate(acc, v[u], s_weight[r * k + i]);
          }
        }
      }
      int s = 0;
      while (s + 1 < R && s_rbase[s + 1] <= g) ++s;
      uint8_t* to = IsFabric(a, s) ? FabricArena(a).combine_outbox(s, g - s_rbase[s])
                                   : ArenaOf(a, s).partial(a.rank, g - s_rbase[s]);
      Store16(to + c * 16, Vec16<T>::Pack(acc));
    }
  }
  Stamp(a, kCombineSummed);

  if (!in_turn) return false;
  // In the whole op the last block raises the ready flags once every other block is done: at
  // decode it has no tokens to sum in the recv half, whereas a block that raised them after its
  // own ticket would start its sums late.
  const bool last = whole ? ChosenLast(a, kTicketCombineSend, blockIdx.x == gridDim.x - 1)
                          : LastBlock(a, kTicketCombineSend);
  Stamp(a, kCombineSent);
  if (last) {
    if (tid == 0) st->combine_step[1] = step;
    SignalPeers(a, DeviceWait::kCombineReady, step);
#pragma unroll 1
    for (int d = tid; a.fabric_mask != 0 && d < R; d += kThreads) {
      a.mailbox->combine_counts[d] = IsFabric(a, d) && good ? s_rbase[d + 1] - s_rbase[d] : 0;
    }
    Publish(a, &a.mailbox->combine_sent, step);
  }
  return last;
}


// Tokens a block sums at a time.
__host__ __device__ inline int64_t PieceTokens(const Layout& lay, int full_grid) {
  return CeilDiv32(lay.max_tokens, full_grid);
}

__host__ __device__ inline int64_t RecvSharedBytes(const Layout& lay, int full_grid) {
  const int64_t R = lay.num_ranks, k = lay.experts_per_token;
  return AlignUp(4 * (4 + R + 1), 8) + PieceTokens(lay, full_grid) * k * 8;
}

// The recv half of `step`, by every block of the grid; ends_step: it ends the step
// (EndRecv).
template <typename T>
__device__ __forceinline__ void RecvBlocks(const NvlinkArgs& a, const CombineRecvIo& io,
                                           bool in_turn, uint64_t step, bool ends_step) {
  const Layout& lay = a.layout;
  const int R = lay.num_ranks, k = lay.experts_per_token;
  const int64_t T_max = lay.max_tokens;
  const Arena me = ArenaOf(a, a.rank);
  NvlinkState* st = me.state();
  const int tid = threadIdx.x;

  extern __shared__ __align__(16) uint8_t smem[];
  const int piece = static_cast<int>(PieceTokens(lay, FullGrid(a)));
  int32_t* s_bad = reinterpret_cast<int32_t*>(smem);  // [4] operand, index, value
  int32_t* s_base = s_bad + 4;                          // [R + 1] first record per rank
  // [piece][k] each slot's partial row, null = none (8-byte aligned: 4 + R + 1 ints before)
  auto** s_src = reinterpret_cast<const uint8_t**>(smem + AlignUp(4 * (4 + R + 1), 8));

  const int32_t raw_num_tokens = *io.num_tokens;
#pragma unroll 1
  for (int d = tid; d < R; d += kThreads) s_base[d + 1] = io.send_tokens[d];
  __syncthreads();
  if (tid == 0) {
    s_bad[0] = -1;
    if (raw_num_tokens < 0 || raw_num_tokens > T_max) {
      s_bad[0] = static_cast<int32_t>(HandleOperand::kNumTokens);
      s_bad[1] = 0;
      s_bad[2] = raw_num_tokens;
    }
    int32_t n = 0;
#pragma unroll 1
    for (int d = 0; d < R; ++d) {
      const int32_t v = s_base[d + 1];
      if ((v < 0 || v > T_max) && s_bad[0] < 0) {
        s_bad[0] = static_cast<int32_t>(HandleOperand::kSendTokens);
        s_bad[1] = d;
        s_bad[2] = v;
      }
      s_base[d] = n;
      n += (v < 0 || v > T_max) ? 0 : v;
    }
    s_base[R] = n;
  }
  __syncthreads();
  const int per_block = CeilDiv32(static_cast<int32_t>(T_max), gridDim.x);
  const int start = static_cast<int>(Min(T_max, blockIdx.x * per_block));
  const int end = static_cast<int>(Min(start + per_block, T_max));  // this block's rows
  const int nt = in_turn && s_bad[0] < 0 ? raw_num_tokens : 0;

  // Where the partial of each slot of rows [lo, hi) is (own data); false, to every thread, if a
  // send_index is out of range.
  const auto find_partials = [&](int lo, int hi) {
    bool sane = true;
#pragma unroll 1
    for (int x = tid; x < (hi - lo) * k; x += kThreads) {
      const int t = lo + a.div.k.Div(x);
      const int64_t at = static_cast<int64_t>(lo) * k + x;
      const int32_t index = t < nt ? io.send_index[at] : -1;
      const uint8_t* src = nullptr;
      if (index >= s_base[R] || index < -1) {
        SetError(a, DeviceError::kBadHandle, static_cast<int64_t>(HandleOperand::kSendIndex), at,
                 index);
        sane = false;
      } else if (index >= 0) {
        int d = 0;
        while (d + 1 < R && s_base[d + 1] <= index) ++d;
        src = InboxOf(a, d).partial(d, index - s_base[d]);
      }
      s_src[x] = src;
    }
    return __syncthreads_and(sane) != 0;
  };
  // The first piece's, while the partials are on their way.
  bool sane = find_partials(start, static_cast<int>(Min(start + piece, end)));

  const bool ok = in_turn && WaitPeers(a, DeviceWait::kCombineReady, step);
  Stamp(a, kCombineArrived);
  const bool good = ok && s_bad[0] < 0;
  if (blockIdx.x == 0 && tid == 0 && ok && s_bad[0] >= 0) {
    SetError(a, DeviceError::kBadHandle, s_bad[0], s_bad[1], s_bad[2]);
  }

  const int vecs = static_cast<int>(lay.combine_row_bytes() / 16);
  const int64_t out_row_bytes = static_cast<int64_t>(lay.hidden) * sizeof(T);
  auto* out = static_cast<uint8_t*>(io.out);
#pragma unroll 1
  for (int lo = start; lo < end; lo += piece) {
    const int hi = static_cast<int>(Min(lo + piece, end));
    if (lo != start) {
      __syncthreads();  // the last piece's sums are done with its partials' places
      sane = find_partials(lo, hi);
    }
    for (int w = tid; w < (hi - lo) * vecs; w += kThreads) {
      const int lt = a.div.combine_vecs.Div(w), c = w - lt * vecs;
      float acc[Vec16<T>::kLanes] = {};
      if (good && sane) {
        for (int i0 = 0; i0 < k; i0 += 4) {
          int4 v[4];
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int i = i0 + u;
            if (i < k && s_src[lt * k + i] != nullptr) {
              v[u] = Load16(s_src[lt * k + i] + c * 16);
            }
          }
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int i = i0 + u;
            if (i < k && s_src[lt * k + i] != nullptr) Vec16<T>::Accumulate(acc, v[u], 1.0f);
          }
        }
      }
      Store16(out + (lo + lt) * out_row_bytes + c * 16, Vec16<T>::Pack(acc));
    }
  }
  Stamp(a, kCombineReduced);

  if (in_turn && ends_step) {
    EndRecv(a, kTicketCombineRecv, st->combine_step, DeviceWait::kCombineCredit,
            &a.mailbox->combine_read, step);
  }
  Stamp(a, kCombineEnd);
}


template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    CombineSendKernel(const __grid_constant__ NvlinkArgs a, const CombineSendIo io) {
  NvlinkState* st = ArenaOf(a, a.rank).state();
  GiveCredits(a, st);
  const bool in_turn = InTurn(a, st->combine_step, /*send=*/true, StepPhase::kCombine);
  SendBlocks<T>(a, io, in_turn, st->combine_step[0] + 1, /*whole=*/false);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    CombineRecvKernel(const __grid_constant__ NvlinkArgs a, const CombineRecvIo io) {
  NvlinkState* st = ArenaOf(a, a.rank).state();
  GiveCredits(a, st);
  const bool in_turn = InTurn(a, st->combine_step, /*send=*/false, StepPhase::kCombine);
  RecvBlocks<T>(a, io, in_turn, st->combine_step[1], /*ends_step=*/true);
}

// The whole op; as for dispatch, every block must be resident at once (LoadCombine checks).
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    CombineKernel(const __grid_constant__ NvlinkArgs a, const CombineSendIo send,
                  const CombineRecvIo recv) {
  NvlinkState* st = ArenaOf(a, a.rank).state();
  GiveCredits(a, st);
  // Read once: the send half's last block advances the steps while others may not have begun.
  const bool in_turn = InTurn(a, st->combine_step, /*send=*/true, StepPhase::kCombine);
  const uint64_t step = st->combine_step[0] + 1;
  const bool last = SendBlocks<T>(a, send, in_turn, step, /*whole=*/true);
  if (last && threadIdx.x == 0 && EndsAtSend(a)) st->combine_step[0] = step;
  __syncthreads();  // the recv half reuses the shared memory
  RecvBlocks<T>(a, recv, in_turn, step, /*ends_step=*/!EndsAtSend(a));
}

bool Float32(const NvlinkArgs& args) { return args.layout.combine_elem_bytes == 4; }

int64_t WholeSharedBytes(const NvlinkArgs& args) {
  return std::max(SendSharedBytes(args.layout, FullGrid(args)),
                  RecvSharedBytes(args.layout, FullGrid(args)));
}

}  // namespace

bool LoadCombine(const NvlinkArgs& args) {
  LoadKernels("loading combine_send", SendSharedBytes(args.layout, FullGrid(args)),
              CombineSendKernel<float>, CombineSendKernel<__nv_bfloat16>);
  LoadKernels("loading combine_recv", RecvSharedBytes(args.layout, FullGrid(args)),
              CombineRecvKernel<float>, CombineRecvKernel<__nv_bfloat16>);
  LoadKernels("loading combine", WholeSharedBytes(args), CombineKernel<float>,
              CombineKernel<__nv_bfloat16>);
  return CoResident("loading combine", Float32(args) ? CombineKernel<float>
                                                     : CombineKernel<__nv_bfloat16>,
                    WholeSharedBytes(args), args);
}

void LaunchCombineSend(const NvlinkArgs& args, const CombineSendIo& io, cudaStream_t stream) {
  LaunchKernel("launching combine_send",
               Float32(args) ? CombineSendKernel<float> : CombineSendKernel<__nv_bfloat16>,
               GridOf(args, FullGrid(args)), SendSharedBytes(args.layout, FullGrid(args)),
               stream, args, io);
}

void LaunchCombineRecv(const NvlinkArgs& args, const CombineRecvIo& io, cudaStream_t stream) {
  LaunchKernel("launching combine_recv",
               Float32(args) ? CombineRecvKernel<float> : CombineRecvKernel<__nv_bfloat16>,
               GridOf(args, Min(args.layout.max_tokens, FullGrid(args))),
               RecvSharedBytes(args.layout, FullGrid(args)), stream, args, io);
}

void LaunchCombine(const NvlinkArgs& args, const CombineSendIo& send, const CombineRecvIo& recv,
                   cudaStream_t stream) {
  if (!args.one_kernel_ops) {
    LaunchCombineSend(args, send, stream);
    LaunchCombineRecv(args, recv, stream);
    return;
  }
  LaunchKernel("launching combine", Float32(args) ? CombineKernel<float> : CombineKernel<__nv_bfloat16>,
               GridOf(args, FullGrid(args)), WholeSharedBytes(args), stream, args, send, recv);
}

}  // namespace jem
