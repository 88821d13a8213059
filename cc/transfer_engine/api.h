// Public types of the TransferEngine: what the layers above (cc/a2a, cc/python) may use.
// The engine moves bytes between registered memory of ranks with RDMA writes carrying a
// 32-bit immediate, driven by one proxy thread; it knows nothing of MoE or JAX.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace jem {

// Every failure is an exception of this type (or a subclass) with a sentence a user can act
// on; libfabric failures carry fi_strerror text. The Python bindings map it to RuntimeError,
// TimeoutError to Python's TimeoutError.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
class TimeoutError : public Error {
 public:
  using Error::Error;
};

using Bytes = std::vector<uint8_t>;

enum class MemoryKind { kHost, kCuda };

struct EngineOptions {
  // libfabric provider: "efa", "verbs;ofi_rxm", "tcp;ofi_rxm" or "shm".
  std::string provider = "tcp;ofi_rxm";
  // Fabric domains (NICs) to open; peers are split across them (peer p -> domain p % n).
  int num_domains = 1;
  // CUDA device whose memory may be registered (FI_HMEM); -1 for host memory only.
  int cuda_device = -1;
  // Core to pin the proxy thread to; -1 leaves it unpinned.
  int pin_cpu = -1;
  // Spin without ever sleeping (lowest latency, one core per engine). When false the proxy
  // spins briefly, then yields and sleeps, so that many ranks can share a few cores.
  bool busy_poll = false;
  // PCI address of the GPU this engine serves ("0000:1b:00.0"): with several NICs, the
  // domains open the NICs nearest to it first. Empty: the provider's order.
  // Nearest: the longest common prefix (in path components) of the GPU's and the NIC's sysfs
  // device paths (realpath of /sys/bus/pci/devices/<address>); a NIC whose PCI address the
  // provider does not report comes last; ties keep the provider's order. Domain d opens NIC
  // d % (number of NICs) of that order.
  std::string gpu_pci_address;
  // Explicit NIC names (libfabric domain names), overriding the choice by PCI distance:
  // domain d opens nic_names[d % nic_names.size()]; a name the provider lacks throws.
  std::vector<std::string> nic_names;
  // Test mode, 0 = off: the proxy holds back arriving immediates and local write completions
  // and releases them in a random order (seeded), as EFA may deliver them.
  // Each event is held at most ~200 us (and at most a few dozen at once). When 0, Create
  // takes the seed from the environment variable JEM_REORDER_SEED (unset or 0: off), so that
  // every engine of a process, the all-to-all contexts' included, can be run reordered.
  uint64_t reorder_seed = 0;
  // Longest single RDMA write; 0: the provider's max_msg_size. Longer writes are split (see
  // Scatter); tests set a small value to exercise the split path on any provider.
  uint64_t max_write_bytes = 0;
};

// A registered region. Obtained from TransferEngine::RegisterMemory; valid until the engine
// is destroyed or DeregisterMemory is called.
struct MemoryRegionId {
  uint32_t value = 0;
};

struct PeerGroupId {
  uint32_t value = 0;
};

// One peer of a group: where it lives and the remote region that writes land in.
struct PeerSpec {
  Bytes address;     // TransferEngine::Address() of the peer
  Bytes descriptor;  // TransferEngine::Descriptor() of the peer's region
};

// One write of a scatter: bytes [src_offset, src_offset + length) of the group's local region
// to [dst_offset, dst_offset + length) of peer `peer`'s remote region. length may be 0: the
// write then carries only its immediate.
struct WriteSpec {
  uint32_t peer = 0;  // index into the group's peers
  uint64_t src_offset = 0;
  uint64_t dst_offset = 0;
  uint64_t length = 0;
};

// A ticket for submitted writes: WaitSent(ticket) returns once they have completed locally,
// so the source bytes may be overwritten.
using SendTicket = uint64_t;

class TransferEngine {
 public:
  // Opens the domains and starts the proxy thread. Throws Error when the provider is not
  // available on this machine (the message lists the providers that are).
  static std::unique_ptr<TransferEngine> Create(const EngineOptions& options);
  virtual ~TransferEngine() = default;

  // Serialized endpoint names of all domains of this engine.
  virtual Bytes Address() const = 0;
  virtual int NumDomains() const = 0;
  virtual std::string Provider() const = 0;
  // Whether CUDA memory can be registered directly (FI_HMEM); otherwise callers stage
  // through pinned host memory.
  virtual bool SupportsCudaMemory() const = 0;

  virtual MemoryRegionId RegisterMemory(void* ptr, size_t length, MemoryKind kind) = 0;
  virtual void DeregisterMemory(MemoryRegionId region) = 0;
  // Serializable remote descriptor (base address and one key per domain).
  virtual Bytes Descriptor(MemoryRegionId region) const = 0;

  // Resolves every peer's address once and pre-builds one write template per peer, so that
  // a scatter fills in only offsets and lengths.
  virtual PeerGroupId AddPeerGroup(MemoryRegionId local, const std::vector<PeerSpec>& peers) = 0;

  // Posts the writes (asynchronously, from the proxy thread), each with immediate `imm`.
  // Offsets and lengths are checked against both regions here; a bad one throws Error.
  // A write longer than the provider's max_msg_size (or max_write_bytes) is split into
  // chunks, and still arrives as one immediate, counted only after all its bytes have landed:
  // the leading chunks go without the immediate and with FI_DELIVERY_COMPLETE, and the last
  // chunk, carrying the immediate, is posted once they have completed (so a split write
  // takes an extra round trip). A provider without FI_DELIVERY_COMPLETE rejects such writes.
  virtual SendTicket Scatter(PeerGroupId group, const WriteSpec* writes, size_t num_writes,
                             uint32_t imm) = 0;
  // A zero-length write with immediate `imm` to every peer of the group.
  virtual SendTicket Barrier(PeerGroupId group, uint32_t imm) = 0;
  virtual void WaitSent(SendTicket ticket, double timeout_s) = 0;

  // Immediate counters: arrivals are counted per immediate value, in any order. A wait for
  // `count` arrivals of `imm` consumes them (the counter drops by `count`), so a value can be
  // reused by a later step. Throws TimeoutError after timeout_s, or Error if the engine
  // has failed (e.g. a completion error from a dead peer).
  virtual void WaitImm(uint32_t imm, uint32_t count, double timeout_s) = 0;
  // Asynchronous forms: when `count` arrivals of `imm` have been seen (and consumed), the
  // proxy stores `value` to *flag with release order (the flag may live in host memory that a
  // GPU maps), or calls `callback` on the proxy thread.
  virtual void NotifyImm(uint32_t imm, uint32_t count, volatile uint32_t* flag,
                         uint32_t value) = 0;
  virtual void NotifyImm(uint32_t imm, uint32_t count, void (*callback)(void*), void* arg) = 0;

  // Non-blocking form of WaitImm: consumes `count` arrivals of `imm` if they are there.
  virtual bool TryConsumeImm(uint32_t imm, uint32_t count) = 0;

  // Runs `hook` on the proxy thread at every turn of its loop until RemovePollHook; the hook
  // returns whether it did work. While a hook is installed the proxy never sleeps (it polls,
  // yielding the core when idle), so a hook can watch memory a GPU writes. A hook may call
  // Scatter, Barrier and TryConsumeImm; an exception it throws fails the engine.
  // Details: hooks run in the order added, before the loop posts and polls; Scatter and
  // Barrier from a hook never block (they queue on the proxy itself, which posts them next);
  // WaitSent and WaitImm from a hook throw Error (they would wait for the proxy itself); a hook
  // may add and remove hooks, itself included. A hook that threw is dropped and the engine's
  // FailureMessage carries its what() text; later hooks keep running.
  virtual uint64_t AddPollHook(std::function<bool()> hook) = 0;
  // Returns once the hook has stopped running and never will again (called from that hook
  // itself: it is not called again after it returns). Any thread. An id this engine never
  // handed out throws Error; the id of a hook dropped for throwing is accepted.
  virtual void RemovePollHook(uint64_t id) = 0;

  // The domain (NIC) through which peer `peer` of `group` is reached.
  virtual int PeerDomain(PeerGroupId group, uint32_t peer) const = 0;
  // Name of domain `index` (libfabric domain name).
  virtual std::string DomainName(int index) const = 0;

  // First fatal error seen by the proxy thread, empty if none.
  virtual std::string FailureMessage() const = 0;
};

}  // namespace jem
