#include "cc/a2a/nvlink_context.h"

#include <cuda_runtime.h>

#include <cctype>
#include <cstddef>
#include <cstring>
#include <string>

namespace jem {
namespace {

// Makes `device` current for the scope.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    CheckCuda(cudaGetDevice(&previous_), "cudaGetDevice");
    CheckCuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

// Whether work enqueued on `stream` is being captured into a CUDA graph (XLA's command
// buffers) rather than run: the graph is replayed later without this host code.
bool Capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  CheckCuda(cudaStreamIsCapturing(stream, &status), "cudaStreamIsCapturing");
  return status != cudaStreamCaptureStatusNone;
}

}  // namespace

std::string CheckNvlinkLayout(const Layout& l) {
  const auto n = [](int64_t v) { return std::to_string(v); };
  if (l.num_ranks < 1 || l.num_ranks > kMaxNvlinkRanks) {
    return "the NVLink path supports 1 to " + n(kMaxNvlinkRanks) + " ranks, not " +
           n(l.num_ranks);
  }
  if (l.num_experts < l.num_ranks || l.num_experts % l.num_ranks != 0) {
    return "num_experts = " + n(l.num_experts) + " must be a multiple of the number of ranks " +
           n(l.num_ranks);
  }
  if (l.num_experts > kMaxNvlinkExperts) {
    return "num_experts = " + n(l.num_experts) + " is more than the NVLink path's " +
           n(kMaxNvlinkExperts);
  }
  if (l.experts_per_token < 1 || l.experts_per_token > 32) {
    return "experts_per_token = " + n(l.experts_per_token) + " must be in [1, 32] on CUDA";
  }
  if (l.hidden < 16 || l.hidden % 16 != 0) {
    return "hidden = " + n(l.hidden) + " must be a positive multiple of 16 on CUDA";
  }
  if (l.has_scales && l.hidden % kScaleBlock != 0) {
    return "hidden = " + n(l.hidden) + " must be a multiple of 128 for float8 dispatch";
  }
  if (l.dispatch_elem_bytes != 1 && l.dispatch_elem_bytes != 2 && l.dispatch_elem_bytes != 4) {
    return "the dispatch dtype must be float8_e4m3fn, bfloat16 or float32";
  }
  if (l.combine_elem_bytes != 2 && l.combine_elem_bytes != 4) {
    return "the combine dtype must be bfloat16 or float32";
  }
  if (l.max_tokens > kMaxNvlinkTokens) {
    // dispatch_send keeps a destination mask per token in shared memory.
    return "max_tokens_per_rank = " + n(l.max_tokens) + " is more than the NVLink path's " +
           n(kMaxNvlinkTokens);
  }
  if (l.max_tokens < 1 || l.max_recv_tokens < 1 || l.expert_alignment < 1) {
    return "max_tokens_per_rank, max_recv_tokens and expert_alignment must be positive";
  }
  return {};
}

NvlinkContext::NvlinkContext(const Layout& layout, int rank, int device, double timeout_s,
                             bool zero_unused_rows, int max_sms, const FabricOptions& fabric)
    : device_(device), timeout_s_(timeout_s) {
  const std::string problem = CheckNvlinkLayout(layout);
  if (!problem.empty()) throw Error(problem + ".");
  if (rank < 0 || rank >= layout.num_ranks) {
    throw Error("rank " + std::to_string(rank) + " is outside [0, " +
                std::to_string(layout.num_ranks) + ").");
  }
  if (!(timeout_s > 0)) throw Error("timeout_s must be positive.");
  args_.layout = layout;
  args_.div = NvlinkDivisors(layout);
  args_.offsets = ArenaOffsets(NvlinkLayout{layout});
  args_.rank = rank;
  args_.timeout_ns = static_cast<uint64_t>(timeout_s * 1e9);
  args_.zero_unused_rows = zero_unused_rows;

  DeviceScope scope(device);
  CheckCuda(cudaDeviceGetAttribute(&args_.num_sms, cudaDevAttrMultiProcessorCount, device),
            "cudaDeviceGetAttribute");
  if (max_sms < 0 || max_sms > args_.num_sms) {
    throw Error("max_sms = " + std::to_string(max_sms) + " is outside [1, " +
                std::to_string(args_.num_sms) + "], the SMs of GPU " + std::to_string(device) +
                " (0: every SM).");
  }
  args_.max_sms = max_sms;
  // Before anything is allocated: it refuses a layout too large for the kernels.
  args_.one_kernel_ops = LoadNvlinkKernels(args_);
  const NvlinkLayout nl{layout};
  CheckCuda(cudaMalloc(&arena_, nl.arena_bytes()), "cudaMalloc of the NVLink arena");
  CheckCuda(cudaMemset(arena_, 0, nl.arena_bytes()), "cudaMemset of the NVLink arena");
  CheckCuda(cudaHostAlloc(reinterpret_cast<void**>(&status_), sizeof(DeviceStatus),
                          cudaHostAllocMapped | cudaHostAllocPortable),
            "cudaHostAlloc of the status word");
  std::memset(status_, 0, sizeof(DeviceStatus));
  void* status_on_device = nullptr;
  CheckCuda(cudaHostGetDevicePointer(&status_on_device, status_, 0), "cudaHostGetDevicePointer");
  args_.status = static_cast<DeviceStatus*>(status_on_device);
  args_.arenas[rank] = arena_;
  CheckCuda(cudaStreamCreateWithFlags(&copy_stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  CheckCuda(cudaEventCreateWithFlags(&packed_, cudaEventDisableTiming), "cudaEventCreate");
  CheckCuda(cudaEventCreateWithFlags(&copies_done_, cudaEventDisableTiming), "cudaEventCreate");
  CheckCuda(cudaEventCreateWithFlags(&joined_, cudaEventDisableTiming), "cudaEventCreate");
  if (fabric.mask != 0) OpenFabric(fabric);
  CheckCuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

void NvlinkContext::OpenFabric(const FabricOptions& fabric) {
  const Layout& l = args_.layout;
  const int rank = args_.rank;
  if ((l.num_ranks < 64 && (fabric.mask >> l.num_ranks) != 0) || ((fabric.mask >> rank) & 1)) {
    throw Error("the fabric peers of rank " + std::to_string(rank) + " must be other ranks.");
  }
  EngineOptions options = fabric.engine;
  options.cuda_device = device_;
  if (options.gpu_pci_address.empty()) options.gpu_pci_address = PciAddress();
  engine_ = TransferEngine::Create(options);

  const NvlinkLayout nl{l};
  bool registered = false;
  if (engine_->SupportsCudaMemory() && !fabric.stage_in_host) {
    // Some providers list FI_HMEM without CUDA support behind it: the registration says so,
    // and the rank stages instead.
    try {
      fabric_region_ = engine_->RegisterMemory(arena_, nl.arena_bytes(), MemoryKind::kCuda);
      args_.fabric_buffer = arena_;
      registered = true;
    } catch (const Error&) {
    }
  }
  if (!registered) {
    CheckCuda(cudaHostAlloc(reinterpret_cast<void**>(&mirror_), nl.arena_bytes(),
                            cudaHostAllocMapped | cudaHostAllocPortable),
              "cudaHostAlloc of the fabric buffer");
    std::memset(mirror_, 0, nl.arena_bytes());
    fabric_region_ = engine_->RegisterMemory(mirror_, nl.arena_bytes(), MemoryKind::kHost);
    void* mapped = nullptr;
    CheckCuda(cudaHostGetDevicePointer(&mapped, mirror_, 0), "cudaHostGetDevicePointer");
    args_.fabric_buffer = static_cast<uint8_t*>(mapped);
  }

  CheckCuda(cudaHostAlloc(reinterpret_cast<void**>(&host_words_), nl.proxy_words_bytes(),
                          cudaHostAllocMapped | cudaHostAllocPortable),
            "cudaHostAlloc of the proxy mailbox");
  std::memset(host_words_, 0, nl.proxy_words_bytes());
  void* mapped = nullptr;
  CheckCuda(cudaHostGetDevicePointer(&mapped, host_words_, 0), "cudaHostGetDevicePointer");
  args_.mailbox = static_cast<ProxyMailbox*>(mapped);
  args_.fabric_signals = static_cast<uint8_t*>(mapped) + nl.proxy_signals_offset();
  args_.fabric_mask = fabric.mask;
}

std::string NvlinkContext::PciAddress() const {
  char bus[32] = {};
  CheckCuda(cudaDeviceGetPCIBusId(bus, sizeof bus, device_), "cudaDeviceGetPCIBusId");
  for (char* c = bus; *c; ++c) *c = static_cast<char>(std::tolower(*c));
  return bus;
}

Bytes NvlinkContext::FabricAddress() const { return engine_ ? engine_->Address() : Bytes(); }

Bytes NvlinkContext::FabricDescriptor() const {
  return engine_ ? engine_->Descriptor(fabric_region_) : Bytes();
}

NvlinkContext::~NvlinkContext() {
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(device_);
  // Kernels of this rank may still be queued: let them finish before the memory goes.
  cudaDeviceSynchronize();
  // The proxy stops touching the mapped words before they go, and the engine (with its
  // registrations) before the buffers it registered.
  proxy_.reset();
  engine_.reset();
  if (mirror_ != nullptr) cudaFreeHost(mirror_);
  if (host_words_ != nullptr) cudaFreeHost(host_words_);
  for (void* p : opened_) cudaIpcCloseMemHandle(p);
  if (packed_ != nullptr) cudaEventDestroy(packed_);
  if (copies_done_ != nullptr) cudaEventDestroy(copies_done_);
  if (joined_ != nullptr) cudaEventDestroy(joined_);
  if (copy_stream_ != nullptr) cudaStreamDestroy(copy_stream_);
  if (arena_ != nullptr) cudaFree(arena_);
  if (status_ != nullptr) cudaFreeHost(status_);
  cudaSetDevice(previous);
}

Bytes NvlinkContext::IpcHandle() const {
  DeviceScope scope(device_);
  cudaIpcMemHandle_t handle;
  CheckCuda(cudaIpcGetMemHandle(&handle, arena_), "cudaIpcGetMemHandle");
  const auto* p = reinterpret_cast<const uint8_t*>(&handle);
  return Bytes(p, p + sizeof(handle));
}

void NvlinkContext::Connect(const std::vector<NvlinkContext*>& local,
                            const std::vector<Bytes>& handles,
                            const std::vector<std::string>& gpus,
                            const std::vector<PeerSpec>& fabric) {
  std::lock_guard<std::mutex> lock(mutex_);
  const int R = args_.layout.num_ranks;
  if (connected_) throw Error("this context is already connected.");
  if (static_cast<int>(local.size()) != R || static_cast<int>(handles.size()) != R) {
    throw Error("connect needs one entry per rank (" + std::to_string(R) + ").");
  }
  DeviceScope scope(device_);
  if (args_.fabric_mask != 0 && static_cast<int>(fabric.size()) != R) {
    throw Error("connect needs the fabric address and descriptor of all " + std::to_string(R) +
                " ranks.");
  }
  if (static_cast<int>(gpus.size()) != R) {
    throw Error("connect needs the GPU (PCI address) of all " + std::to_string(R) + " ranks.");
  }
  const std::string mine = PciAddress();
  for (int r = 0; r < R; ++r) {
    if (r == args_.rank || ((args_.fabric_mask >> r) & 1)) continue;
    if (gpus[r] == mine) args_.same_gpu_mask |= uint64_t{1} << r;
    if (local[r] != nullptr) {
      const int peer = local[r]->device();
      if (peer != device_) {
        int can = 0;
        CheckCuda(cudaDeviceCanAccessPeer(&can, device_, peer), "cudaDeviceCanAccessPeer");
        if (!can) {
          throw Error("GPU " + std::to_string(device_) + " cannot access GPU " +
                      std::to_string(peer) + " directly (no NVLink/P2P path).");
        }
        const cudaError_t err = cudaDeviceEnablePeerAccess(peer, 0);
        if (err == cudaErrorPeerAccessAlreadyEnabled) {
          cudaGetLastError();
        } else {
          CheckCuda(err, "cudaDeviceEnablePeerAccess");
        }
      }
      args_.arenas[r] = local[r]->arena();
    } else {
      if (handles[r].size() != sizeof(cudaIpcMemHandle_t)) {
        throw Error("the IPC handle of rank " + std::to_string(r) + " has " +
                    std::to_string(handles[r].size()) + " bytes, expected " +
                    std::to_string(sizeof(cudaIpcMemHandle_t)) + ".");
      }
      cudaIpcMemHandle_t handle;
      std::memcpy(&handle, handles[r].data(), sizeof(handle));
      void* p = nullptr;
      CheckCuda(cudaIpcOpenMemHandle(&p, handle, cudaIpcMemLazyEnablePeerAccess),
                ("cudaIpcOpenMemHandle for rank " + std::to_string(r)).c_str());
      opened_.push_back(p);
      args_.arenas[r] = static_cast<uint8_t*>(p);
    }
  }
  if (engine_) {
    const NvlinkLayout nl{args_.layout};
    proxy_ = std::make_unique<FabricProxy>(
        *engine_, args_.layout, args_.rank, args_.fabric_mask, fabric_region_,
        reinterpret_cast<ProxyMailbox*>(host_words_), host_words_ + nl.proxy_signals_offset(),
        fabric);
  }
  connected_ = true;
}

void NvlinkContext::AfterStagedCopies(cudaStream_t stream, bool capturing) {
  // A send rewrites the outboxes only once the last staged send's copies have read them.
  // Under capture, waiting for the copies of an uncaptured step would take an event wait node,
  // which CUDA allows in no graph loop or conditional (where XLA may put this call). It is not
  // needed there: the kernel writes the outboxes only after every peer's credit for the step
  // before, which each peer gives once it has seen the ready flag that the copy engine writes
  // to it behind that step's data, and the last flag is the last copy of the step.
  if (!capturing) CheckCuda(cudaStreamWaitEvent(stream, copies_done_, 0), "cudaStreamWaitEvent");
}

void NvlinkContext::EnqueueDispatch(const DispatchSendIo& send, const DispatchRecvIo& recv,
                                    cudaStream_t stream) {
  AfterStagedCopies(stream, Capturing(stream));
  LaunchDispatch(args_, send, recv, stream);
}

void NvlinkContext::EnqueueDispatchSend(const DispatchSendIo& io, bool staged,
                                        cudaStream_t stream) {
  const bool capturing = Capturing(stream);
  AfterStagedCopies(stream, capturing);
  LaunchDispatchSend(args_, io, staged, stream);
  // The peers the copy engine serves: NVLink peers on other GPUs.
  const int me = args_.rank;
  uint64_t copied = 0;
  for (int d = 0; d < args_.layout.num_ranks; ++d) {
    const bool stored = d == me || (((args_.fabric_mask | args_.same_gpu_mask) >> d) & 1);
    if (!stored) copied |= uint64_t{1} << d;
  }
  if (!staged || copied == 0) return;
  CheckCuda(cudaEventRecord(packed_, stream), "cudaEventRecord");
  CheckCuda(cudaStreamWaitEvent(copy_stream_, packed_, 0), "cudaStreamWaitEvent");
  // Whole outboxes (T records each): the host does not know how many records the kernel
  // packed, and the receiver reads only those. The kernel stored the route rows itself. The
  // flag goes last, by the copy engine too: copies on one stream complete in order.
  const NvlinkLayout nl{args_.layout};
  const int64_t k = args_.layout.experts_per_token;
  for (int d = 0; d < args_.layout.num_ranks; ++d) {
    if (!((copied >> d) & 1)) continue;
    const struct {
      int64_t to, from, bytes;
    } parts[] = {
        {nl.slot_rank_record_offset(me, 0), nl.outbox_slot_rank_offset(d, 0), nl.T() * k * 4},
        {nl.record_offset(me, 0), nl.outbox_record_offset(d, 0),
         nl.T() * args_.layout.record_bytes()},
        {nl.dispatch_ready_offset(me),
         nl.state_offset() + static_cast<int64_t>(offsetof(NvlinkState, staged_ready)), 8},
    };
    for (const auto& part : parts) {
      CheckCuda(cudaMemcpyAsync(args_.arenas[d] + part.to, arena_ + part.from, part.bytes,
                                cudaMemcpyDefault, copy_stream_),
                "cudaMemcpyAsync to a peer's arena");
    }
  }
  if (capturing) {
    // A stream forked inside a capture must join it before the capture ends, so the captured
    // send ends with its copies (legal in graph loops and conditionals: edges, memcpy nodes).
    CheckCuda(cudaEventRecord(joined_, copy_stream_), "cudaEventRecord");
    CheckCuda(cudaStreamWaitEvent(stream, joined_, 0), "cudaStreamWaitEvent");
  } else {
    CheckCuda(cudaEventRecord(copies_done_, copy_stream_), "cudaEventRecord");
  }
}

void NvlinkContext::Synchronize() const {
  DeviceScope scope(device_);
  CheckCuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

std::string NvlinkContext::Failure() const {
  if (!connected_) return "rank " + std::to_string(args_.rank) + ": the context is not connected.";
  if (status_->code == 0) return {};
  const Layout& l = args_.layout;
  std::string text = DescribeDeviceStatus(
      *status_, StatusLimits{l.num_experts, l.max_tokens, l.max_recv_tokens,
                             l.max_recv_records(), timeout_s_});
  // A silent fabric peer often has a cause the engine saw (a failed write to a dead peer).
  const std::string fabric = engine_ ? engine_->FailureMessage() : std::string();
  if (!fabric.empty()) text += " (fabric: " + fabric + ")";
  return text;
}

void NvlinkContext::CheckUsable() const {
  const std::string failure = Failure();
  if (!failure.empty()) {
    throw ContextUnusable("the all-to-all context failed earlier: " + failure);
  }
}

bool NvlinkContext::HostSeesSteps(cudaStream_t stream) {
  captured_ = captured_ || Capturing(stream);
  return !captured_;
}

void NvlinkContext::BeginSend(bool combine, cudaStream_t stream) {
  if (!HostSeesSteps(stream)) return;
  if (pending_[combine]) {
    const std::string phase = combine ? "combine" : "dispatch";
    throw InputError(phase + "_send was called twice without " + phase + "_recv between.");
  }
  pending_[combine] = true;
}

void NvlinkContext::BeginRecv(bool combine, cudaStream_t stream) {
  if (!HostSeesSteps(stream)) return;
  if (!pending_[combine]) {
    const std::string phase = combine ? "combine" : "dispatch";
    throw InputError(phase + "_recv was called without a " + phase + "_send before it.");
  }
  pending_[combine] = false;
}

}  // namespace jem
