#include "cc/transfer_engine/peer_group.h"

#include <string>

namespace jem {

std::vector<ParsedPeer> ParsePeers(const std::vector<PeerSpec>& peers) {
  std::vector<ParsedPeer> out;
  out.reserve(peers.size());
  for (size_t i = 0; i < peers.size(); ++i) {
    try {
      out.push_back({ParseAddress(peers[i].address), RemoteRegion::Parse(peers[i].descriptor)});
    } catch (const Error& e) {
      throw Error("peer " + std::to_string(i) + ": " + e.what());
    }
    if (out.back().region.keys.size() != out.back().names.size()) {
      throw Error("peer " + std::to_string(i) + ": its descriptor has " +
                  std::to_string(out.back().region.keys.size()) + " keys but its address " +
                  std::to_string(out.back().names.size()) +
                  " domains; pass the descriptor and address of the same engine");
    }
  }
  return out;
}

PeerGroup::PeerGroup(uint32_t id, const MemoryRegion& local,
                     const std::vector<std::unique_ptr<FabricDomain>>& domains,
                     const std::vector<ParsedPeer>& peers)
    : id_(id), region_id_(local.id()), local_base_(local.base()), local_length_(local.length()),
      peers_(peers.size()) {
  for (size_t p = 0; p < peers.size(); ++p) {
    const ParsedPeer& spec = peers[p];
    Peer& peer = peers_[p];
    uint32_t d = static_cast<uint32_t>(p % domains.size());
    // Our domain d talks to the peer's domain of the same index (wrapping when it has fewer).
    uint32_t remote_d = d % spec.names.size();
    peer.domain = domains[d].get();
    fi_addr_t addr = peer.domain->Resolve(spec.names[remote_d]);
    peer.remote_addr0 = peer.domain->virtual_addressing() ? spec.region.base : 0;
    peer.remote_length = spec.region.length;
    peer.desc = local.local_desc(d);
    peer.rma.key = spec.region.keys[remote_d];
    peer.msg.msg_iov = &peer.iov;
    peer.msg.desc = &peer.desc;
    peer.msg.iov_count = 1;
    peer.msg.addr = addr;
    peer.msg.rma_iov = &peer.rma;
    peer.msg.rma_iov_count = 1;
  }
}

void PeerGroup::Check(const WriteSpec& w) const {
  if (w.peer >= peers_.size()) {
    throw Error("write to peer " + std::to_string(w.peer) + ", but peer group " +
                std::to_string(id_) + " has " + std::to_string(peers_.size()) + " peers");
  }
  const Peer& peer = peers_[w.peer];
  if (w.src_offset > local_length_ || w.length > local_length_ - w.src_offset) {
    throw Error("write of " + std::to_string(w.length) + " bytes from offset " +
                std::to_string(w.src_offset) + " overruns the local region of " +
                std::to_string(local_length_) + " bytes");
  }
  if (w.dst_offset > peer.remote_length || w.length > peer.remote_length - w.dst_offset) {
    throw Error("write of " + std::to_string(w.length) + " bytes to offset " +
                std::to_string(w.dst_offset) + " overruns peer " + std::to_string(w.peer) +
                "'s region of " + std::to_string(peer.remote_length) + " bytes");
  }
  if (w.length > peer.domain->max_write() && !peer.domain->can_split()) {
    throw Error("write of " + std::to_string(w.length) + " bytes exceeds provider '" +
                peer.domain->provider() + "''s limit of " +
                std::to_string(peer.domain->max_write()) +
                " bytes per write, and the provider cannot split it (no FI_DELIVERY_COMPLETE)");
  }
}

FabricDomain* PeerGroup::Prepare(const WriteSpec& w, uint32_t imm, OpContext* context,
                                 const fi_msg_rma** msg) {
  Peer& peer = peers_[w.peer];
  peer.iov.iov_base = local_base_ + w.src_offset;
  peer.iov.iov_len = w.length;
  peer.rma.addr = peer.remote_addr0 + w.dst_offset;
  peer.rma.len = w.length;
  peer.msg.context = &context->fi;
  peer.msg.data = imm;
  context->domain = peer.domain->index();
  context->group = id_;
  context->peer = w.peer;
  *msg = &peer.msg;
  return peer.domain;
}

}  // namespace jem
