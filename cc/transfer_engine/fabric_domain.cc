#include "cc/transfer_engine/fabric_domain.h"

#include <rdma/fi_cm.h>
#include <rdma/fi_errno.h>

#include <algorithm>
#include <cstring>

#include "cc/transfer_engine/nic_topology.h"
#include "cc/transfer_engine/wire_format.h"

namespace jem {
namespace {

constexpr uint32_t kAddressMagic = 0x414d454a;  // "JEMA"
// Receives kept posted when the provider asks for FI_RX_CQ_DATA.
constexpr size_t kPostedReceives = 256;

// Hints for every domain: RDM endpoints doing RMA writes with remote CQ data. The mr_mode bits
// listed are the ones this code honours; the provider returns the subset it requires.
// FI_MSG|FI_RECV are asked for so that receives can be posted if the provider needs
// FI_RX_CQ_DATA (remote CQ data consuming a receive, as efa-direct does).
fi_info* MakeHints(const char* provider, bool hmem, uint64_t op_flags) {
  fi_info* hints = fi_allocinfo();
  hints->tx_attr->op_flags = op_flags;
  hints->ep_attr->type = FI_EP_RDM;
  hints->caps = FI_RMA | FI_WRITE | FI_REMOTE_WRITE | FI_MSG | FI_RECV | (hmem ? FI_HMEM : 0);
  hints->mode = FI_CONTEXT | FI_CONTEXT2 | FI_RX_CQ_DATA;
  hints->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED |
                                FI_MR_PROV_KEY | FI_MR_ENDPOINT | (hmem ? FI_MR_HMEM : 0);
  hints->domain_attr->threading = FI_THREAD_DOMAIN;
  if (provider) hints->fabric_attr->prov_name = strdup(provider);
  return hints;
}

int GetInfo(const char* provider, bool hmem, fi_info** info, uint64_t op_flags = 0) {
  fi_info* hints = MakeHints(provider, hmem, op_flags);
  int rc = fi_getinfo(FI_VERSION(FI_MAJOR_VERSION, FI_MINOR_VERSION), nullptr, nullptr, 0, hints,
                      info);
  fi_freeinfo(hints);
  return rc;
}

std::string Join(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& s : items) out += (out.empty() ? "" : ", ") + s;
  return out.empty() ? "none" : out;
}

// The NICs in the order domains take them: nic_names as given, else nearest the GPU first,
// else the provider's order.
std::vector<fi_info*> ChooseNics(const std::vector<fi_info*>& nics, const EngineOptions& options) {
  if (!options.nic_names.empty()) {
    std::vector<fi_info*> chosen;
    for (const std::string& name : options.nic_names) {
      auto it = std::find_if(nics.begin(), nics.end(),
                             [&](fi_info* n) { return name == n->domain_attr->name; });
      if (it == nics.end()) {
        std::vector<std::string> offered;
        for (fi_info* n : nics) offered.push_back(n->domain_attr->name);
        throw Error("NIC '" + name + "' (nic_names) is not offered by provider '" +
                    options.provider + "' here; it offers: " + Join(offered));
      }
      chosen.push_back(*it);
    }
    return chosen;
  }
  if (options.gpu_pci_address.empty() || nics.size() < 2) return nics;
  std::string gpu = PciDevicePath(options.gpu_pci_address);
  if (gpu.empty()) {
    throw Error("gpu_pci_address '" + options.gpu_pci_address +
                "' is not a PCI device under /sys/bus/pci/devices");
  }
  std::vector<std::string> paths;
  for (fi_info* n : nics) paths.push_back(PciDevicePath(NicPciAddress(n)));
  std::vector<fi_info*> chosen;
  for (size_t i : OrderByPciDistance(gpu, paths)) chosen.push_back(nics[i]);
  return chosen;
}

}  // namespace

std::string FabricErrorText(const std::string& what, long rc) {
  return what + ": " + fi_strerror(static_cast<int>(-rc)) + " (" + std::to_string(rc) + ")";
}

void CheckFabric(long rc, const std::string& what) {
  if (rc < 0) throw Error(FabricErrorText(what, rc));
}

std::vector<std::string> AvailableProviders() {
  fi_info* info = nullptr;
  std::vector<std::string> names;
  if (GetInfo(nullptr, false, &info) != 0) return names;
  for (fi_info* i = info; i; i = i->next) {
    std::string name = i->fabric_attr->prov_name;
    if (std::find(names.begin(), names.end(), name) == names.end()) names.push_back(name);
  }
  fi_freeinfo(info);
  return names;
}

std::vector<std::unique_ptr<FabricDomain>> FabricDomain::OpenAll(const EngineOptions& options) {
  if (options.num_domains < 1) throw Error("num_domains must be at least 1");
  // CUDA memory needs FI_HMEM; a provider without it still serves host memory.
  bool hmem = options.cuda_device >= 0;
  fi_info* info = nullptr;
  int rc = GetInfo(options.provider.c_str(), hmem, &info);
  if (rc == -FI_ENODATA && hmem) {
    hmem = false;
    rc = GetInfo(options.provider.c_str(), false, &info);
  }
  if (rc != 0) {
    throw Error(FabricErrorText("libfabric provider '" + options.provider +
                                    "' offers no FI_EP_RDM endpoint with RMA writes here "
                                    "(fi_getinfo)",
                                rc) +
                ". Providers available: " + Join(AvailableProviders()));
  }
  // One entry per distinct NIC (fi_getinfo may list a NIC more than once).
  std::vector<fi_info*> nics;
  for (fi_info* i = info; i; i = i->next) {
    bool seen = std::any_of(nics.begin(), nics.end(), [&](fi_info* n) {
      return std::strcmp(n->domain_attr->name, i->domain_attr->name) == 0;
    });
    if (!seen) nics.push_back(i);
  }
  try {
    nics = ChooseNics(nics, options);
  } catch (...) {
    fi_freeinfo(info);
    throw;
  }
  // Asked separately: as a hint it would become every write's default.
  fi_info* probe = nullptr;
  bool can_split = GetInfo(options.provider.c_str(), hmem, &probe, FI_DELIVERY_COMPLETE) == 0;
  if (probe) fi_freeinfo(probe);
  std::vector<std::unique_ptr<FabricDomain>> domains;
  try {
    for (int d = 0; d < options.num_domains; ++d) {
      fi_info* nic = nics[d % nics.size()];
      if (nic->domain_attr->cq_data_size < 4) {
        throw Error("provider '" + options.provider + "' carries only " +
                    std::to_string(nic->domain_attr->cq_data_size) +
                    " bytes of remote CQ data; 4 are needed for the immediate");
      }
      uint64_t max_write = nic->ep_attr->max_msg_size;
      if (options.max_write_bytes > 0) max_write = std::min(max_write, options.max_write_bytes);
      domains.emplace_back(new FabricDomain(fi_dupinfo(nic), d, hmem, max_write, can_split));
    }
  } catch (...) {
    fi_freeinfo(info);
    throw;
  }
  fi_freeinfo(info);
  return domains;
}

FabricDomain::FabricDomain(fi_info* info, uint32_t index, bool supports_hmem,
                           uint64_t max_write, bool can_split)
    : info_(info), index_(index), supports_hmem_(supports_hmem),
      mr_mode_(info->domain_attr->mr_mode), max_write_(max_write), can_split_(can_split) {
  const std::string where = " (domain " + std::to_string(index) + ", " + provider() + ")";
  try {
    CheckFabric(fi_fabric(info_->fabric_attr, &fabric_, nullptr), "fi_fabric" + where);
    CheckFabric(fi_domain(fabric_, info_, &domain_, nullptr), "fi_domain" + where);
    fi_cq_attr cq_attr{};
    cq_attr.format = FI_CQ_FORMAT_DATA;
    cq_attr.wait_obj = FI_WAIT_NONE;
    CheckFabric(fi_cq_open(domain_, &cq_attr, &cq_, nullptr), "fi_cq_open" + where);
    fi_av_attr av_attr{};
    av_attr.type = FI_AV_TABLE;
    CheckFabric(fi_av_open(domain_, &av_attr, &av_, nullptr), "fi_av_open" + where);
    CheckFabric(fi_endpoint(domain_, info_, &ep_, nullptr), "fi_endpoint" + where);
    CheckFabric(fi_ep_bind(ep_, &cq_->fid, FI_TRANSMIT | FI_RECV), "fi_ep_bind(cq)" + where);
    CheckFabric(fi_ep_bind(ep_, &av_->fid, 0), "fi_ep_bind(av)" + where);
    CheckFabric(fi_enable(ep_), "fi_enable" + where);
    name_.resize(256);
    size_t len = name_.size();
    CheckFabric(fi_getname(&ep_->fid, name_.data(), &len), "fi_getname" + where);
    name_.resize(len);
    if (info_->mode & FI_RX_CQ_DATA) {
      size_t n = std::min(kPostedReceives, info_->rx_attr->size);
      for (size_t i = 0; i < n; ++i) {
        receives_.push_back(std::make_unique<OpContext>());
        receives_.back()->kind = OpContext::Kind::kReceive;
        receives_.back()->domain = index_;
        PostReceive(receives_.back().get());
      }
    }
  } catch (...) {
    Close();
    throw;
  }
}

FabricDomain::~FabricDomain() { Close(); }

void FabricDomain::Close() {
  if (ep_) fi_close(&ep_->fid);
  if (av_) fi_close(&av_->fid);
  if (cq_) fi_close(&cq_->fid);
  if (domain_) fi_close(&domain_->fid);
  if (fabric_) fi_close(&fabric_->fid);
  ep_ = nullptr, av_ = nullptr, cq_ = nullptr, domain_ = nullptr, fabric_ = nullptr;
  if (info_) fi_freeinfo(info_);
  info_ = nullptr;
}

fid_mr* FabricDomain::Register(void* ptr, size_t length, MemoryKind kind, int cuda_device,
                               uint64_t requested_key) {
  if (kind == MemoryKind::kCuda && !supports_hmem_) {
    throw Error("provider '" + provider() +
                "' cannot register CUDA memory here (no FI_HMEM); stage through pinned host "
                "memory");
  }
  iovec iov{ptr, length};
  fi_mr_attr attr{};
  attr.mr_iov = &iov;
  attr.iov_count = 1;
  attr.access = FI_WRITE | FI_REMOTE_WRITE;
  attr.requested_key = requested_key;
  if (kind == MemoryKind::kCuda) {
    attr.iface = FI_HMEM_CUDA;
    attr.device.cuda = cuda_device;
  } else {
    attr.iface = FI_HMEM_SYSTEM;
  }
  fid_mr* mr = nullptr;
  const std::string where = " of " + std::to_string(length) + " bytes (domain " +
                            std::to_string(index_) + ", " + provider() + ")";
  CheckFabric(fi_mr_regattr(domain_, &attr, 0, &mr), "fi_mr_regattr" + where);
  if (mr_mode_ & FI_MR_ENDPOINT) {
    long rc = fi_mr_bind(mr, &ep_->fid, 0);
    if (rc == 0) rc = fi_mr_enable(mr);
    if (rc != 0) {
      fi_close(&mr->fid);
      CheckFabric(rc, "fi_mr_bind/fi_mr_enable" + where);
    }
  }
  return mr;
}

fi_addr_t FabricDomain::Resolve(const Bytes& name) {
  std::string key(name.begin(), name.end());
  auto it = resolved_.find(key);
  if (it != resolved_.end()) return it->second;
  fi_addr_t addr = FI_ADDR_NOTAVAIL;
  int n = fi_av_insert(av_, name.data(), 1, &addr, 0, nullptr);
  if (n != 1 || addr == FI_ADDR_NOTAVAIL) {
    CheckFabric(n < 0 ? n : -FI_EINVAL,
                "fi_av_insert of a peer address (domain " + std::to_string(index_) + ")");
  }
  resolved_.emplace(std::move(key), addr);
  return addr;
}

std::string FabricDomain::ReadCompletionError(fi_cq_err_entry* entry) {
  *entry = {};
  ssize_t rc = fi_cq_readerr(cq_, entry, 0);
  if (rc < 0) return FabricErrorText("fi_cq_readerr", rc);
  char buf[256] = {};
  const char* detail = fi_cq_strerror(cq_, entry->prov_errno, entry->err_data, buf, sizeof buf);
  return std::string(fi_strerror(entry->err)) + " (provider: " + (detail ? detail : "") + ")";
}

void FabricDomain::PostReceive(OpContext* context) {
  ssize_t rc;
  do {
    rc = fi_recv(ep_, nullptr, 0, nullptr, FI_ADDR_UNSPEC, &context->fi);
    if (rc == -FI_EAGAIN) fi_cq_read(cq_, nullptr, 0);
  } while (rc == -FI_EAGAIN);
  CheckFabric(rc, "fi_recv for remote CQ data (domain " + std::to_string(index_) + ")");
}

void FabricDomain::RepostReceive(OpContext* context) { PostReceive(context); }

Bytes SerializeAddress(const std::vector<Bytes>& names) {
  ByteWriter w(kAddressMagic);
  w.U32(static_cast<uint32_t>(names.size()));
  for (const auto& n : names) w.Blob(n);
  return w.Take();
}

std::vector<Bytes> ParseAddress(const Bytes& address) {
  ByteReader r(address, kAddressMagic, "engine address");
  std::vector<Bytes> names(r.U32());
  if (names.empty()) throw Error("engine address is malformed (no domains)");
  for (auto& n : names) n = r.Blob();
  r.End();
  return names;
}

}  // namespace jem
