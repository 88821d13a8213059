// One rank's all-to-all state on a GPU: its arena (cudaMalloc'd once, laid out by
// nvlink_layout.h), every NVLink peer's arena as mapped on this GPU (peer access within one
// process, CUDA IPC between processes), the sticky status its kernels report into, and for
// peers on other nodes a TransferEngine, a fabric buffer and the proxy protocol (FabricProxy).
//
// Set-up (create, exchange handles, connect, close) may allocate and synchronize; the step
// functions only enqueue work: kernels on the caller's stream, and for a staged send, copies
// on this rank's copy stream. The proxy thread follows the kernels through mapped memory.
// The step functions may run under stream capture (XLA's command buffers), whose graph is
// replayed later without them: what a step needs lives in device or mapped memory.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cc/a2a/errors.h"
#include "cc/a2a/fabric_proxy.h"
#include "cc/base/layout.h"
#include "cc/base/nvlink_layout.h"
#include "cc/kernels/nvlink_kernels.h"
#include "cc/transfer_engine/api.h"

namespace jem {

// How a rank reaches its peers on other nodes.
struct FabricOptions {
  uint64_t mask = 0;             // bit r: rank r is on another node (0: NVLink only)
  EngineOptions engine;          // provider and NICs; cuda_device is filled in
  bool stage_in_host = false;    // pinned host fabric buffer even where FI_HMEM is offered
};

class NvlinkContext {
 public:
  // Allocates the arena and the status on `device`, and with fabric peers opens the engine
  // and the fabric buffer. `max_sms` bounds the SMs each kernel occupies (0: every SM). Throws
  // Error for a layout the kernels do not support, a max_sms past the device's SMs or a
  // missing provider, CudaError for a CUDA failure.
  NvlinkContext(const Layout& layout, int rank, int device, double timeout_s,
                bool zero_unused_rows, int max_sms = 0, const FabricOptions& fabric = {});
  ~NvlinkContext();
  NvlinkContext(const NvlinkContext&) = delete;
  NvlinkContext& operator=(const NvlinkContext&) = delete;

  // The arena's CUDA IPC handle, for ranks in other processes.
  Bytes IpcHandle() const;
  // What fabric peers need to reach this rank: the engine's address and the fabric buffer's
  // remote descriptor (empty without fabric peers).
  Bytes FabricAddress() const;
  Bytes FabricDescriptor() const;
  // Whether the fabric buffer is pinned host memory (no FI_HMEM, or asked for).
  bool FabricStaged() const { return mirror_ != nullptr; }
  std::string FabricProvider() const { return engine_ ? engine_->Provider() : std::string(); }

  // The PCI address of this rank's GPU ("0000:1b:00.0").
  std::string PciAddress() const;

  // Maps every NVLink peer's arena: ranks in this process come from `local` (indexed by rank,
  // null for ranks of other processes; their GPUs get peer access), the others are opened
  // from their IPC handles (indexed by rank). `gpus`: every rank's PciAddress. Fabric peers
  // are reached through `fabric` (indexed by rank, entries of other ranks unused), and the
  // proxy starts serving.
  void Connect(const std::vector<NvlinkContext*>& local, const std::vector<Bytes>& handles,
               const std::vector<std::string>& gpus, const std::vector<PeerSpec>& fabric = {});

  const Layout& layout() const { return args_.layout; }
  int rank() const { return args_.rank; }
  int device() const { return device_; }
  uint8_t* arena() const { return arena_; }
  const NvlinkArgs& args() const { return args_; }
  // Where the kernels enqueued from now on stamp their phases (NvlinkArgs::phase_clock;
  // null: nowhere): device memory of [2 * SMs][kNumPhases] words, for profiling.
  void SetPhaseClock(uint64_t* stamps) { args_.phase_clock = stamps; }

  // Enqueues dispatch's send half on `stream`. Staged, the kernel packs what goes to peers into
  // the outboxes, and the copy stream moves them over NVLink once the kernel is done, then
  // raises the ready flags: `stream` is free for other work while the bytes move (under stream
  // capture, once the copies are done: the capture must end with them). Direct, the kernel
  // stores straight into the peers' arenas (the least latency when nothing overlaps).
  // Throws CudaError.
  void EnqueueDispatchSend(const DispatchSendIo& io, bool staged, cudaStream_t stream);

  // Enqueues the whole dispatch on `stream`: one kernel where the grid fits on the GPU at
  // once, else the direct send half and the recv half. Throws CudaError.
  void EnqueueDispatch(const DispatchSendIo& send, const DispatchRecvIo& recv,
                       cudaStream_t stream);

  // Waits for every kernel queued on this rank's GPU (set-up and teardown only).
  void Synchronize() const;

  // Where this rank's fabric steps spent their time so far (zeros without fabric peers).
  FabricTimes ProxyTimes() const { return proxy_ ? proxy_->Times() : FabricTimes{}; }

  // Empty, or why no step may run: not connected, or the first error its kernels reported
  // (read from mapped memory, no sync).
  std::string Failure() const;
  // Throws ContextUnusable with Failure() unless it is empty.
  void CheckUsable() const;

  // Host-side order of the halves (calls arrive in stream order): throws InputError when a
  // recv half has no send half before it, or a send half repeats. Once a call of this context
  // was captured into a CUDA graph (`stream` capturing), replays run steps the host never sees,
  // and only the kernels check the order (into the DeviceStatus).
  void BeginSend(bool combine, cudaStream_t stream);
  void BeginRecv(bool combine, cudaStream_t stream);

 private:
  void OpenFabric(const FabricOptions& fabric);
  // Makes `stream` (capturing: under stream capture) wait until the last staged send's copies
  // have read the outboxes.
  void AfterStagedCopies(cudaStream_t stream, bool capturing);
  // Whether the host still sees every step: no call of this context was captured yet.
  bool HostSeesSteps(cudaStream_t stream);

  NvlinkArgs args_;
  int device_;
  double timeout_s_;
  uint8_t* arena_ = nullptr;
  int32_t* count_scratch_ = nullptr;
  DeviceStatus* status_ = nullptr;
  std::vector<void*> opened_;  // IPC mappings to close
  // Fabric peers: destroyed in reverse order (the proxy stops before the engine goes).
  std::unique_ptr<TransferEngine> engine_;
  uint8_t* mirror_ = nullptr;      // pinned host fabric buffer when staged
  uint8_t* host_words_ = nullptr;  // pinned host: ProxyMailbox, then the fabric signals
  MemoryRegionId fabric_region_;
  std::unique_ptr<FabricProxy> proxy_;
  cudaStream_t copy_stream_ = nullptr;
  cudaEvent_t packed_ = nullptr;       // the staged send kernel is done
  cudaEvent_t copies_done_ = nullptr;  // the copy stream has read the outboxes (uncaptured)
  cudaEvent_t joined_ = nullptr;       // the copies of a captured staged send
  bool connected_ = false;
  bool captured_ = false;             // a call was captured into a CUDA graph
  bool pending_[2] = {false, false};  // dispatch, combine: send half without its recv half
  std::mutex mutex_;
};

// Every unsupported choice of the layout on the NVLink path, as a sentence; empty if none.
std::string CheckNvlinkLayout(const Layout& layout);

}  // namespace jem
