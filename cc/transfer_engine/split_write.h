// A write longer than its domain's max_write, posted as chunks. The receiver counts one
// arrival per write and must count it only once every byte has landed, while EFA does not
// order writes: so the leading chunks carry no immediate and are posted with
// FI_DELIVERY_COMPLETE, and the last chunk, carrying the immediate, is posted only once
// they have all completed.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cc/transfer_engine/api.h"

namespace jem {

class PeerGroup;

struct SplitWrite {
  SplitWrite(SendTicket ticket, PeerGroup* group, const WriteSpec& write, uint32_t imm,
             uint64_t chunk)
      : ticket(ticket), group(group), write(write), imm(imm), chunk(chunk),
        leading((write.length - 1) / chunk * chunk) {}

  // The next leading chunk to post.
  WriteSpec NextChunk() const { return Part(posted, std::min(chunk, leading - posted)); }
  // The last chunk, 1 to `chunk` bytes: the one that carries the immediate.
  WriteSpec Last() const { return Part(leading, write.length - leading); }
  bool all_posted() const { return posted == leading; }

  SendTicket ticket;
  PeerGroup* group;
  WriteSpec write;
  uint32_t imm;
  uint64_t chunk;
  uint64_t leading;        // bytes before the last chunk
  uint64_t posted = 0;     // leading bytes posted so far
  uint32_t in_flight = 0;  // leading chunks posted and not yet completed

 private:
  WriteSpec Part(uint64_t offset, uint64_t length) const {
    return WriteSpec{write.peer, write.src_offset + offset, write.dst_offset + offset, length};
  }
};

}  // namespace jem
