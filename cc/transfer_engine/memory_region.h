// A buffer registered in every domain of an engine, and the descriptor a peer needs to write
// into it: base address, length and one key per domain.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "cc/transfer_engine/api.h"
#include "cc/transfer_engine/fabric_domain.h"

namespace jem {

// What a peer knows of a region it writes into.
struct RemoteRegion {
  uint64_t base = 0;
  uint64_t length = 0;
  std::vector<uint64_t> keys;  // one per domain of the owning engine

  Bytes Serialize() const;
  static RemoteRegion Parse(const Bytes& descriptor);
};

class MemoryRegion {
 public:
  // Registers the buffer in every domain (on the proxy thread). `id` doubles as the requested
  // key where the provider does not pick keys itself.
  MemoryRegion(const std::vector<std::unique_ptr<FabricDomain>>& domains, void* ptr,
               size_t length, MemoryKind kind, int cuda_device, uint32_t id);
  ~MemoryRegion();
  MemoryRegion(const MemoryRegion&) = delete;
  MemoryRegion& operator=(const MemoryRegion&) = delete;

  uint32_t id() const { return id_; }
  uint8_t* base() const { return base_; }
  size_t length() const { return length_; }
  // Local descriptor for operations on `domain`: nullptr unless the provider wants it
  // (FI_MR_LOCAL, or FI_MR_HMEM for CUDA memory).
  void* local_desc(uint32_t domain) const { return descs_[domain]; }
  RemoteRegion Remote() const;

 private:
  uint32_t id_;
  uint8_t* base_;
  size_t length_;
  std::vector<fid_mr*> mrs_;
  std::vector<void*> descs_;
};

}  // namespace jem
