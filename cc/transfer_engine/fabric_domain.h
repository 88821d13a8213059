// One libfabric domain ("NIC"): fabric, domain, a reliable-datagram endpoint, its completion
// queue and address vector, and the memory-registration rules its provider asks for.
// Every call on a domain's objects after Open happens on the proxy thread (FI_THREAD_DOMAIN).
#pragma once

#include <rdma/fabric.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_eq.h>
#include <rdma/fi_rma.h>

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "cc/transfer_engine/api.h"

namespace jem {

// "<what>: <fi_strerror text> (<rc>)" for a negative libfabric return code.
std::string FabricErrorText(const std::string& what, long rc);
// Throws Error(FabricErrorText(what, rc)) when rc < 0.
void CheckFabric(long rc, const std::string& what);

// Providers that offer FI_EP_RDM endpoints with RMA writes on this machine, without
// duplicates, in fi_getinfo's order.
std::vector<std::string> AvailableProviders();

// Every libfabric operation carries one of these as its context (FI_CONTEXT/FI_CONTEXT2 mode:
// the provider owns the leading fi_context2 until the operation completes).
struct SplitWrite;
struct OpContext {
  fi_context2 fi;
  // kChunk: a leading chunk of a split write (no immediate; completion means delivered).
  enum class Kind : uint8_t { kWrite, kChunk, kReceive } kind = Kind::kWrite;
  uint32_t domain = 0;
  uint32_t group = 0;
  uint32_t peer = 0;
  uint64_t ticket = 0;
  SplitWrite* split = nullptr;  // kChunk
};

class FabricDomain {
 public:
  // Opens `num_domains` domains of `provider`. Distinct NICs the provider reports are used in
  // turn (nic_names, else nearest gpu_pci_address first, else the provider's order); with
  // fewer NICs than domains, a NIC hosts several domains.
  static std::vector<std::unique_ptr<FabricDomain>> OpenAll(const EngineOptions& options);
  ~FabricDomain();
  FabricDomain(const FabricDomain&) = delete;
  FabricDomain& operator=(const FabricDomain&) = delete;

  uint32_t index() const { return index_; }
  const Bytes& name() const { return name_; }
  std::string provider() const { return info_->fabric_attr->prov_name; }
  // libfabric's domain name: the NIC ("rdmap16s27", "lo", "shm").
  std::string nic_name() const { return info_->domain_attr->name; }
  bool supports_hmem() const { return supports_hmem_; }
  // FI_MR_LOCAL: local buffers of an operation need their registration's descriptor.
  bool needs_local_desc() const { return mr_mode_ & FI_MR_LOCAL; }
  // FI_MR_VIRT_ADDR: remote addresses are virtual addresses, otherwise offsets into the region.
  bool virtual_addressing() const { return mr_mode_ & FI_MR_VIRT_ADDR; }
  uint64_t max_msg_size() const { return info_->ep_attr->max_msg_size; }
  // Longest write posted as one: max_msg_size, or EngineOptions::max_write_bytes if smaller.
  uint64_t max_write() const { return max_write_; }
  // Whether longer writes can be split: chunks then need FI_DELIVERY_COMPLETE.
  bool can_split() const { return can_split_; }

  // Registers [ptr, ptr + length) for local writes and remote writes. `requested_key` is used
  // unless the provider picks keys (FI_MR_PROV_KEY).
  fid_mr* Register(void* ptr, size_t length, MemoryKind kind, int cuda_device,
                   uint64_t requested_key);
  // Inserts a peer endpoint name into the address vector once; later calls hit a cache.
  fi_addr_t Resolve(const Bytes& name);

  ssize_t PostWrite(const fi_msg_rma& msg) {
    return fi_writemsg(ep_, &msg, FI_REMOTE_CQ_DATA);
  }
  // A leading chunk of a split write: no immediate, and its completion means its bytes are
  // in the target's memory.
  ssize_t PostChunk(const fi_msg_rma& msg) {
    return fi_writemsg(ep_, &msg, FI_DELIVERY_COMPLETE);
  }
  ssize_t ReadCompletions(fi_cq_data_entry* entries, size_t max) {
    return fi_cq_read(cq_, entries, max);
  }
  // After ReadCompletions returned -FI_EAVAIL: the error entry and its text.
  std::string ReadCompletionError(fi_cq_err_entry* entry);
  // FI_RX_CQ_DATA mode: a remote write with CQ data consumed this posted receive; post it again.
  void RepostReceive(OpContext* context);

 private:
  FabricDomain(fi_info* info, uint32_t index, bool supports_hmem, uint64_t max_write,
               bool can_split);
  void PostReceive(OpContext* context);
  void Close();

  fi_info* info_;
  uint32_t index_;
  bool supports_hmem_;
  uint64_t mr_mode_;
  uint64_t max_write_;
  bool can_split_;
  fid_fabric* fabric_ = nullptr;
  fid_domain* domain_ = nullptr;
  fid_cq* cq_ = nullptr;
  fid_av* av_ = nullptr;
  fid_ep* ep_ = nullptr;
  Bytes name_;
  std::unordered_map<std::string, fi_addr_t> resolved_;
  std::vector<std::unique_ptr<OpContext>> receives_;
};

// An engine's address: the endpoint names of all its domains.
Bytes SerializeAddress(const std::vector<Bytes>& names);
std::vector<Bytes> ParseAddress(const Bytes& address);

}  // namespace jem
