// combine, send half (expert side): for each received record, the weighted sum of its expert
// output rows (float32 accumulation), stored once in the combine dtype straight into the home
// rank's partial slot (over NVLink for peers; into the combine outbox for fabric home ranks,
// which the proxy writes); then raise this rank's ready flag at every NVLink home rank and
// tell the proxy. Before writing, wait for each home rank's credit for the previous combine.
// Blocks own contiguous record ranges, which they sum in pieces of at most the full grid's
// share (one piece unless an SM budget shrank the grid).
#include "cc/kernels/device_utils.cuh"
#include "cc/kernels/launch.cuh"
#include "cc/kernels/nvlink_kernels.h"

namespace jem {
namespace {

using namespace device;

// Records a block sums at a time.
__host__ __device__ inline int64_t PieceRecords(const Layout& lay, int full_grid) {
  return CeilDiv(lay.max_recv_records(), full_grid);
}

__host__ __device__ inline int64_t SendSharedBytes(const Layout& lay, int full_grid) {
  const int64_t R = lay.num_ranks, k = lay.experts_per_token;
  return 4 * (4 + (R + 1)) + PieceRecords(lay, full_grid) * k * 8;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    CombineSendKernel(const __grid_constant__ NvlinkArgs a, const CombineSendIo io) {
  const Layout& lay = a.layout;
  const int R = lay.num_ranks, k = lay.experts_per_token;
  const int64_t M = lay.max_recv_tokens, N = lay.max_recv_records(), T_max = lay.max_tokens;
  const Arena me = ArenaOf(a, a.rank);
  NvlinkState* st = me.state();
  const int tid = threadIdx.x;

  const bool in_turn = InTurn(a, st->combine_step, /*send=*/true, StepPhase::kCombine);
  const uint64_t step = st->combine_step[0] + 1;

  extern __shared__ __align__(16) uint8_t smem[];
  const int piece = static_cast<int>(PieceRecords(lay, FullGrid(a)));
  float* s_weight = reinterpret_cast<float*>(smem);                    // [piece][k]
  int32_t* s_row = reinterpret_cast<int32_t*>(s_weight + piece * k);  // [piece][k]
  int32_t* s_bad = s_row + piece * k;                                  // [4]
  int32_t* s_rbase = s_bad + 4;                                        // [R + 1]

  for (int src = tid; src < R; src += kThreads) s_rbase[src + 1] = io.recv_tokens[src];
  __syncthreads();
  if (tid == 0) {
    int32_t n = 0;
    s_bad[0] = -1;
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

  // This block's records [g0, g1), a piece at a time. The rows and weights of a piece's slots
  // are own data: the first piece's are read while the credits may still be on their way.
  const int64_t total = s_rbase[R];
  const int per_block = static_cast<int>(CeilDiv(total, gridDim.x));
  const int g0 = static_cast<int>(Min(total, blockIdx.x * per_block));
  const int g1 = in_turn && s_bad[0] < 0 ? static_cast<int>(Min(total, g0 + per_block)) : g0;
  const auto read_slots = [&](int p0, int nrec) {
    for (int x = tid; x < nrec * k; x += kThreads) {
      const int64_t at = static_cast<int64_t>(p0) * k + x;
      const int32_t row = io.record_rows[at];
      if (row < -1 || row >= M) {
        SetError(a, DeviceError::kBadHandle, static_cast<int64_t>(HandleOperand::kRecordRows),
                 at, row);
      }
      const bool use = row >= 0 && row < M;
      s_row[x] = use ? row : -1;
      s_weight[x] = use ? io.record_weights[at] : 0.0f;
    }
  };
  read_slots(g0, Min(g1, g0 + piece) - g0);

  const bool ok = in_turn && WaitPeers(a, DeviceWait::kCombineCredit, step - 1);
  const bool good = ok && s_bad[0] < 0;
  if (blockIdx.x == 0 && tid == 0 && ok && !good) {
    SetError(a, DeviceError::kBadHandle, static_cast<int64_t>(HandleOperand::kRecvTokens),
             s_bad[0], s_bad[1]);
  }
  if (blockIdx.x == 0 && io.sent != nullptr) {
    for (int src = tid; src < R; src += kThreads) io.sent[src] = good ? io.recv_tokens[src] : 0;
  }

  // One 16-byte vector of the partial per item: up to k loads in flight, then one store.
  const int vecs = static_cast<int>(lay.combine_row_bytes() / 16);
  const int64_t y_row_bytes = static_cast<int64_t>(lay.hidden) * sizeof(T);
  const auto* y = static_cast<const uint8_t*>(io.expert_y);
  for (int p0 = g0; good && p0 < g1; p0 += piece) {
    const int nrec = Min(p0 + piece, g1) - p0;
    if (p0 != g0) {
      __syncthreads();  // the last piece's sums are done with its slots
      read_slots(p0, nrec);
      __syncthreads();
    }
    for (int w = tid; w < nrec * vecs; w += kThreads) {
      const int r = w / vecs, c = w % vecs;
      const int g = p0 + r;
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

  if (!in_turn) return;
  if (LastBlock(a, kTicketCombineSend, step)) {
    if (tid == 0) st->combine_step[1] = step;
    SignalPeers(a, DeviceWait::kCombineReady, step);
    for (int d = tid; a.fabric_mask != 0 && d < R; d += kThreads) {
      a.mailbox->combine_counts[d] = IsFabric(a, d) && good ? s_rbase[d + 1] - s_rbase[d] : 0;
    }
    Publish(a, &a.mailbox->combine_sent, step);
  }
}

}  // namespace

void LoadCombineSend(const NvlinkArgs& args) {
  LoadKernels("loading combine_send", SendSharedBytes(args.layout, FullGrid(args)),
              CombineSendKernel<float>, CombineSendKernel<__nv_bfloat16>);
}

void LaunchCombineSend(const NvlinkArgs& args, const CombineSendIo& io, cudaStream_t stream) {
  LaunchKernel("launching combine_send",
               args.layout.combine_elem_bytes == 4 ? CombineSendKernel<float>
                                                   : CombineSendKernel<__nv_bfloat16>,
               GridOf(args, FullGrid(args)), SendSharedBytes(args.layout, FullGrid(args)),
               stream, args, io);
}

}  // namespace jem
