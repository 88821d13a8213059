// A set of peers resolved once: each peer's endpoint is inserted into the address vector of
// the domain that serves it (peer p -> domain p % num_domains), and a write template
// (fi_msg_rma with its iovec, descriptor, rma_iov and address) is pre-built, so that a scatter
// fills in only offsets, lengths and the immediate.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "cc/transfer_engine/api.h"
#include "cc/transfer_engine/fabric_domain.h"
#include "cc/transfer_engine/memory_region.h"

namespace jem {

// A peer as the caller described it, parsed: its endpoint names and its region.
struct ParsedPeer {
  std::vector<Bytes> names;  // one per domain of the peer's engine
  RemoteRegion region;
};
std::vector<ParsedPeer> ParsePeers(const std::vector<PeerSpec>& peers);

class PeerGroup {
 public:
  // Resolves addresses: run on the proxy thread.
  PeerGroup(uint32_t id, const MemoryRegion& local,
            const std::vector<std::unique_ptr<FabricDomain>>& domains,
            const std::vector<ParsedPeer>& peers);
  PeerGroup(const PeerGroup&) = delete;
  PeerGroup& operator=(const PeerGroup&) = delete;

  uint32_t id() const { return id_; }
  uint32_t region_id() const { return region_id_; }
  size_t size() const { return peers_.size(); }
  uint32_t domain_of(uint32_t peer) const { return peers_[peer].domain->index(); }
  // Writes to `peer` longer than this are split.
  uint64_t max_write(uint32_t peer) const { return peers_[peer].domain->max_write(); }

  // Any thread: throws Error unless the write fits both regions and can be posted (a write
  // beyond the provider's limit needs a provider that can split it).
  void Check(const WriteSpec& w) const;
  // Proxy thread: the domain serving the write's peer and the message to post, filled in.
  // For a chunk of a split write, `w` is the chunk.
  FabricDomain* Prepare(const WriteSpec& w, uint32_t imm, OpContext* context,
                        const fi_msg_rma** msg);

 private:
  struct Peer {
    FabricDomain* domain = nullptr;
    uint64_t remote_addr0 = 0;  // remote address of offset 0 (base, or 0 without VIRT_ADDR)
    uint64_t remote_length = 0;
    iovec iov{};
    void* desc = nullptr;
    fi_rma_iov rma{};
    fi_msg_rma msg{};
  };

  uint32_t id_;
  uint32_t region_id_;
  uint8_t* local_base_;
  uint64_t local_length_;
  std::vector<Peer> peers_;
};

}  // namespace jem
