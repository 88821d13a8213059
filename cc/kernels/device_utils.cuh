// Device helpers shared by the NVLink kernels: 16-byte vector loads and stores, system-scope
// release/acquire flags (peers on other GPUs write and read them over NVLink), deadlines on
// %globaltimer, the sticky error status, the per-kernel block ticket, and bf16 arithmetic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cc/base/nvlink_layout.h"
#include "cc/base/device_status.h"
#include "cc/kernels/launch.cuh"
#include "cc/kernels/nvlink_kernels.h"

namespace jem {
namespace device {

constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------- memory

// Inputs of the kernel (XLA buffers): read-only for its whole life, so the non-coherent path.
__device__ __forceinline__ int4 LoadInput16(const void* p) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Arena data that a peer wrote before raising the flag this thread acquired.
__device__ __forceinline__ int4 Load16(const void* p) {
  int4 v;
  asm volatile("ld.global.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Stores that may cross NVLink: no L1 allocation, 16 bytes per thread.
__device__ __forceinline__ void Store16(void* p, int4 v) {
  asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1, %2, %3, %4};"
               :
               : "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

__device__ __forceinline__ uint64_t LoadAcquireSys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t LoadAcquireGpu(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void AddReleaseGpu(uint64_t* p, uint64_t v) {
  asm volatile("red.release.gpu.global.add.u64 [%0], %1;" : : "l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t FetchAddAcqRelGpu(uint64_t* p, uint64_t v) {
  uint64_t old;
  asm volatile("atom.acq_rel.gpu.global.add.u64 %0, [%1], %2;"
               : "=l"(old) : "l"(p), "l"(v) : "memory");
  return old;
}

__device__ __forceinline__ void StoreReleaseSys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" : : "l"(p), "l"(v) : "memory");
}

// Raises *p to at least v, with no fence: a flag given again by another kernel never goes back.
__device__ __forceinline__ void MaxRelaxedSys(uint64_t* p, uint64_t v) {
  asm volatile("red.relaxed.sys.global.max.u64 [%0], %1;" : : "l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t GlobalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// For x = first, first + kThreads, ... below n: use(x, load(x)), with the loads of kBatch
// consecutive x issued before any is used, so that a thread waits for memory once per batch.
template <int kBatch, typename Load, typename Use>
__device__ __forceinline__ void Batched(int first, int n, Load load, Use use) {
  for (int base = first; base < n; base += kThreads * kBatch) {
    decltype(load(0)) v[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int x = base + u * kThreads;
      if (x < n) v[u] = load(x);
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int x = base + u * kThreads;
      if (x < n) use(x, v[u]);
    }
  }
}

// Stamps the end of `phase` for this block, where the clock is on (NvlinkArgs::phase_clock).
__device__ __forceinline__ void Stamp(const NvlinkArgs& a, Phase phase) {
  if (a.phase_clock != nullptr && threadIdx.x == 0) {
    a.phase_clock[blockIdx.x * kNumPhases + phase] = GlobalTimerNs();
  }
}

// ---------------------------------------------------------------- arena

struct Arena {
  const ArenaOffsets& off;  // NvlinkArgs::offsets, in the kernel's parameters
  uint8_t* base;

  template <typename T = uint8_t>
  __device__ __forceinline__ T* at(int64_t offset) const {
    return reinterpret_cast<T*>(base + offset);
  }
  __device__ NvlinkState* state() const { return at<NvlinkState>(off.state); }
  __device__ uint64_t* flag(int64_t offset) const { return at<uint64_t>(offset); }
  __device__ int32_t* route_row(int64_t sender) const {
    return at<int32_t>(off.route_row.at(sender));
  }
  __device__ int32_t* slot_rank(int64_t sender, int64_t index) const {
    return at<int32_t>(off.slot_rank.at(sender, index));
  }
  __device__ uint8_t* record(int64_t sender, int64_t index) const {
    return at(off.record.at(sender, index));
  }
  __device__ uint8_t* partial(int64_t expert_rank, int64_t index) const {
    return at(off.partial.at(expert_rank, index));
  }
  __device__ int32_t* outbox_route(int64_t dest) const {
    return at<int32_t>(off.outbox_route.at(dest));
  }
  __device__ int32_t* outbox_slot_rank(int64_t dest, int64_t index) const {
    return at<int32_t>(off.outbox_slot_rank.at(dest, index));
  }
  __device__ uint8_t* outbox_record(int64_t dest, int64_t index) const {
    return at(off.outbox_record.at(dest, index));
  }
  __device__ uint8_t* combine_outbox(int64_t home_rank, int64_t index) const {
    return at(off.combine_outbox.at(home_rank, index));
  }
};

__device__ __forceinline__ Arena ArenaOf(const NvlinkArgs& a, int rank) {
  return Arena{a.offsets, a.arenas[rank]};
}

__device__ __forceinline__ bool IsFabric(const NvlinkArgs& a, int rank) {
  return (a.fabric_mask >> rank) & 1;
}

// Where what `sender` sent this rank lives: this rank's arena, or the fabric buffer for a
// sender on another node (the same offsets either way).
__device__ __forceinline__ Arena InboxOf(const NvlinkArgs& a, int sender) {
  return Arena{a.offsets, IsFabric(a, sender) ? a.fabric_buffer : a.arenas[a.rank]};
}

// The fabric buffer, where outboxes for fabric peers are packed.
__device__ __forceinline__ Arena FabricArena(const NvlinkArgs& a) {
  return Arena{a.offsets, a.fabric_buffer};
}

// ---------------------------------------------------------------- errors

__device__ __forceinline__ bool Failed(const NvlinkState* st) {
  return *reinterpret_cast<const volatile uint32_t*>(&st->error) != 0;
}

// The first error of a rank wins; its details reach the host before its code does.
static __device__ __noinline__ void SetError(const NvlinkArgs& a, DeviceError code, int64_t x,
                                      int64_t y, int64_t z) {
  NvlinkState* st = ArenaOf(a, a.rank).state();
  if (atomicCAS(&st->error, 0u, static_cast<uint32_t>(code)) != 0u) return;
  DeviceStatus* s = a.status;
  *reinterpret_cast<volatile int32_t*>(&s->rank) = a.rank;
  s->a = x;
  s->b = y;
  s->c = z;
  __threadfence_system();
  s->code = static_cast<uint32_t>(code);
  __threadfence_system();
}

// Where a rank's flag for `what` from `peer` lives in its own arena.
__device__ __forceinline__ int64_t WaitOffset(const NvlinkLayout& nl, DeviceWait what, int peer) {
  switch (what) {
    case DeviceWait::kDispatchCredit: return nl.dispatch_credit_offset(peer);
    case DeviceWait::kDispatchReady: return nl.dispatch_ready_offset(peer);
    case DeviceWait::kCombineCredit: return nl.combine_credit_offset(peer);
    case DeviceWait::kDispatchRoute: return nl.dispatch_route_offset(peer);
    default: return nl.combine_ready_offset(peer);
  }
}

// Whether this rank failed in a way its peers cannot learn from the protocol: anything but bad
// input (its route row says so) and a capacity verdict (every rank reaches it) or the news of
// either. Such a rank raises no more flags, so that its peers time out with an error instead of
// reading what it did not write: a replayed command buffer keeps running its kernels, with no
// host left to refuse the next step.
__device__ __forceinline__ bool Silent(const NvlinkState* st) {
  switch (static_cast<DeviceError>(*reinterpret_cast<const volatile uint32_t*>(&st->error))) {
    case DeviceError::kNone:
    case DeviceError::kBadExpertId:
    case DeviceError::kBadNumTokens:
    case DeviceError::kPeerFailed:
    case DeviceError::kCapacity:
      return false;
    default:
      return true;
  }
}

// The halves of a phase alternate: a send follows the recv of the step before
// (steps[1] == steps[0]), a recv follows a send (steps[1] == steps[0] + 1). The kernels check
// it, not the host, which does not see the steps a command buffer replays. Every block reads
// the same words: a kernel writes its step in its last block only. Out of turn, the first
// block records why; the caller then skips its waits, its peers and its step (whose outputs
// it still defines).
__device__ __forceinline__ bool InTurn(const NvlinkArgs& a, const uint64_t* steps, bool send,
                                       StepPhase phase) {
  const uint64_t received = steps[0], sent = steps[1];
  const bool in_turn = send ? sent == received : sent != received;
  if (!in_turn && blockIdx.x == 0 && threadIdx.x == 0) {
    SetError(a, send ? DeviceError::kSendTwice : DeviceError::kRecvWithoutSend,
             static_cast<int64_t>(phase), static_cast<int64_t>(send ? sent : received), 0);
  }
  return in_turn;
}

// Spins until *flag >= target. On the deadline it records a timeout and returns false. Once a
// rank has failed, its later waits for a flag not yet raised fail at once: the kernels of the
// failed step and of any step the host enqueued before it saw the failure then finish without
// waiting, whatever their peers' hosts did (every rank learns of a bad-input or capacity
// failure in the same step, from the route rows). The flag is read first: a wait that needs
// no waiting costs one load.
static __device__ __noinline__ bool WaitFlag(const NvlinkArgs& a, const uint64_t* flag, uint64_t target,
                                      DeviceWait what, int peer) {
  if (LoadAcquireSys(flag) >= target) return true;
  const NvlinkState* st = ArenaOf(a, a.rank).state();
  const uint64_t start = GlobalTimerNs();
  while (LoadAcquireSys(flag) < target) {
    if (Failed(st)) return false;
    if (GlobalTimerNs() - start > a.timeout_ns) {
      SetError(a, DeviceError::kTimeout, static_cast<int64_t>(what), peer,
               static_cast<int64_t>(target));
      return false;
    }
    __nanosleep(32);
  }
  return true;
}

// This rank's flag for `what` from `peer`: in its arena, or where the proxy raises it for a
// fabric peer (whose route row comes with its records, under the ready flag).
__device__ __forceinline__ const uint64_t* FlagOf(const NvlinkArgs& a, DeviceWait what,
                                                  int peer) {
  const NvlinkLayout nl{a.layout};
  if (what == DeviceWait::kDispatchRoute && IsFabric(a, peer)) what = DeviceWait::kDispatchReady;
  const uint8_t* base = IsFabric(a, peer) ? a.fabric_signals : a.arenas[a.rank];
  return reinterpret_cast<const uint64_t*>(base + WaitOffset(nl, what, peer));
}

// Threads 0..R-1 of the block each wait for one peer's flag; returns (to every thread of the
// block) whether all arrived.
__device__ __forceinline__ bool WaitPeers(const NvlinkArgs& a, DeviceWait what, uint64_t target) {
  bool ok = true;
  if (static_cast<int>(threadIdx.x) < a.layout.num_ranks) {
    ok = WaitFlag(a, FlagOf(a, what, threadIdx.x), target, what, threadIdx.x);
  }
  return __syncthreads_and(ok) != 0;
}

// Raises this rank's flag for `what` in NVLink peer p's arena, unless this rank is Silent.
// Fabric peers hear of it from the proxy (Publish).
__device__ __forceinline__ void SignalPeer(const NvlinkArgs& a, DeviceWait what, int p,
                                           uint64_t step) {
  if (!IsFabric(a, p) && !Silent(ArenaOf(a, a.rank).state())) {
    const Arena peer = ArenaOf(a, p);
    StoreReleaseSys(peer.flag(WaitOffset(NvlinkLayout{a.layout}, what, a.rank)), step);
  }
}

// Thread p < R of the last block raises this rank's flag in peer p's arena.
__device__ __forceinline__ void SignalPeers(const NvlinkArgs& a, DeviceWait what, uint64_t step) {
  if (static_cast<int>(threadIdx.x) < a.layout.num_ranks) SignalPeer(a, what, threadIdx.x, step);
}

// The last block tells the proxy that `step` is ready for fabric peers (after the counts it
// covers, written by the caller), unless this rank is Silent: its fabric peers then time out,
// as its NVLink peers do. Everything the grid wrote before is visible to the host and the
// NIC first.
__device__ __forceinline__ void Publish(const NvlinkArgs& a, uint64_t* word, uint64_t step) {
  if (a.fabric_mask == 0) return;
  __syncthreads();
  if (threadIdx.x == 0 && !Silent(ArenaOf(a, a.rank).state())) {
    __threadfence_system();
    StoreReleaseSys(word, step);
  }
}

// ---------------------------------------------------------------- completion

// Called by every block once all its threads are done: returns (to every thread) whether
// this block is the last of the kernel's grid to finish. The ticket is one acq_rel atomic: it
// releases the block's writes (ordered before it by the barrier) and, in the last block,
// acquires every other block's. GPU scope is enough, also for the blocks' stores into peers:
// the last block then publishes with a release at system scope (SignalPeer), and release is
// cumulative, so a peer that acquires the flag sees every block's stores. The last block
// resets the ticket for the next kernel of its kind, which starts only once this one has ended
// (one stream), with a grid of its own.
__device__ __forceinline__ bool LastBlock(const NvlinkArgs& a, NvlinkTicket kind) {
  __shared__ int last;
  __syncthreads();
  if (threadIdx.x == 0) {
    auto* ticket = &ArenaOf(a, a.rank).state()->ticket[kind];
    last = FetchAddAcqRelGpu(ticket, 1) + 1 == gridDim.x;
    if (last) *ticket = 0;
  }
  __syncthreads();
  return last != 0;
}

// LastBlock for a grid whose blocks are all resident at once (a whole op's), with the last
// block chosen in advance: every other block adds to the ticket (a release, no round trip)
// and goes on, and `chosen` waits until all have (acquire), then resets the ticket. Returns
// `chosen` (to every thread of a block); false in the chosen block where the others never came
// (a timeout, recorded).
__device__ __forceinline__ bool ChosenLast(const NvlinkArgs& a, NvlinkTicket kind, bool chosen) {
  __shared__ int arrived;
  __syncthreads();
  if (threadIdx.x == 0) {
    auto* ticket = &ArenaOf(a, a.rank).state()->ticket[kind];
    if (!chosen) {
      AddReleaseGpu(ticket, 1);
    } else {
      const uint64_t others = gridDim.x - 1, start = GlobalTimerNs();
      bool all = true;
      while (all && LoadAcquireGpu(ticket) < others) {
        if (GlobalTimerNs() - start > a.timeout_ns) {
          SetError(a, DeviceError::kTimeout, static_cast<int64_t>(DeviceWait::kOwnBlocks), a.rank,
                   static_cast<int64_t>(others));
          all = false;
        }
      }
      *ticket = 0;
      arrived = all;
    }
  }
  __syncthreads();
  return chosen && arrived != 0;
}

// How a recv kernel ends step `step`: its last block records the step in steps[0] and gives
// the senders their credit (NVLink peers by flag, fabric peers through the proxy's `read`).
// A whole op's kernel with no fabric peer skips it (EndsAtSend): the last block of its send
// half records both steps, and the next kernel gives the credits (GiveCredits), which saves a
// block ticket at the end of every step.
__device__ __forceinline__ void EndRecv(const NvlinkArgs& a, NvlinkTicket ticket, uint64_t* steps,
                                        DeviceWait credit, uint64_t* read, uint64_t step) {
  if (!LastBlock(a, ticket)) return;
  if (threadIdx.x == 0) steps[0] = step;
  SignalPeers(a, credit, step);
  Publish(a, read, step);
}

// Whether a whole op's kernel ends its step in its send half's last block, with no ticket
// after its recv half: only without fabric peers, whose proxy learns of the end from EndRecv.
__device__ __forceinline__ bool EndsAtSend(const NvlinkArgs& a) { return a.fabric_mask == 0; }

// Called by every kernel at its start: every kernel before it on the stream has ended, so the
// recv halves of the steps its state records are done with what the senders wrote, and the
// last block gives the NVLink peers their credits for them (again where EndRecv already did: a
// max, so that neither undoes the other). Relaxed: the reads the credit covers ended with their
// kernel. A peer that waits for a credit is in the next step of that op, which this rank joins
// with a kernel that gives it: no wait outlasts this rank's own progress.
__device__ __forceinline__ void GiveCredits(const NvlinkArgs& a, const NvlinkState* st) {
  const int p = static_cast<int>(threadIdx.x);
  if (blockIdx.x == gridDim.x - 1 && p < a.layout.num_ranks && !IsFabric(a, p) && !Silent(st)) {
    const NvlinkLayout nl{a.layout};
    const Arena peer = ArenaOf(a, p);
    MaxRelaxedSys(peer.flag(nl.dispatch_credit_offset(a.rank)), st->dispatch_step[0]);
    MaxRelaxedSys(peer.flag(nl.combine_credit_offset(a.rank)), st->combine_step[0]);
  }
}

// ---------------------------------------------------------------- warp and block scans

__device__ __forceinline__ unsigned LaneMaskLt() {
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

__device__ __forceinline__ int32_t WarpSum(int32_t v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(kFullMask, v, d);
  return v;
}

// Shared scratch of BlockExclusiveScan2, in ints.
constexpr int kScanScratch = 2 * (kThreads / 32);

// Exclusive prefix sums of a[0..n) and of b[0..n) into out_a[0..n] and out_b[0..n], the totals
// last, by the whole block (every thread calls it); the totals are visible after the caller's
// next barrier. kThreads values per round, each warp's scanned by shuffles, then the warps'.
__device__ __forceinline__ void BlockExclusiveScan2(const int32_t* a, const int32_t* b,
                                                    int32_t* out_a, int32_t* out_b, int n,
                                                    int32_t* scratch) {
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int32_t carry_a = 0, carry_b = 0;
  for (int base = 0; base < n; base += kThreads) {
    const int i = base + static_cast<int>(threadIdx.x);
    const int32_t xa = i < n ? a[i] : 0, xb = i < n ? b[i] : 0;
    int32_t ia = xa, ib = xb;  // inclusive, within the warp
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int32_t ya = __shfl_up_sync(kFullMask, ia, d), yb = __shfl_up_sync(kFullMask, ib, d);
      if (lane >= d) {
        ia += ya;
        ib += yb;
      }
    }
    if (lane == 31) {
      scratch[warp] = ia;
      scratch[kWarps + warp] = ib;
    }
    __syncthreads();
    if (warp == 0) {
      int32_t sa = lane < kWarps ? scratch[lane] : 0, sb = lane < kWarps ? scratch[kWarps + lane] : 0;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int32_t ya = __shfl_up_sync(kFullMask, sa, d), yb = __shfl_up_sync(kFullMask, sb, d);
        if (lane >= d) {
          sa += ya;
          sb += yb;
        }
      }
      if (lane < kWarps) {
        scratch[lane] = sa;
        scratch[kWarps + lane] = sb;
      }
    }
    __syncthreads();
    if (i < n) {
      out_a[i] = carry_a + (warp > 0 ? scratch[warp - 1] : 0) + ia - xa;
      out_b[i] = carry_b + (warp > 0 ? scratch[kWarps + warp - 1] : 0) + ib - xb;
    }
    carry_a += scratch[kWarps - 1];
    carry_b += scratch[2 * kWarps - 1];
    __syncthreads();  // the next round rewrites the scratch
  }
  if (threadIdx.x == 0) {
    out_a[n] = carry_a;
    out_b[n] = carry_b;
  }
}

// ---------------------------------------------------------------- arithmetic

template <typename T>
struct Vec16;  // 16 bytes of T as float32 lanes

template <>
struct Vec16<__nv_bfloat16> {
  static constexpr int kLanes = 8;
  __device__ __forceinline__ static void Accumulate(float* acc, int4 v, float w) {
    const auto* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      acc[2 * i] = fmaf(w, f.x, acc[2 * i]);
      acc[2 * i + 1] = fmaf(w, f.y, acc[2 * i + 1]);
    }
  }
  __device__ __forceinline__ static int4 Pack(const float* acc) {
    int4 v;
    auto* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
    return v;
  }
};

template <>
struct Vec16<float> {
  static constexpr int kLanes = 4;
  __device__ __forceinline__ static void Accumulate(float* acc, int4 v, float w) {
    const auto* f = reinterpret_cast<const float*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] = fmaf(w, f[i], acc[i]);
  }
  __device__ __forceinline__ static int4 Pack(const float* acc) {
    int4 v;
    auto* f = reinterpret_cast<float*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = acc[i];
    return v;
  }
};

}  // namespace device
}  // namespace jem
