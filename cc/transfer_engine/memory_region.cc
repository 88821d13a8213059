#include "cc/transfer_engine/memory_region.h"

#include "cc/transfer_engine/wire_format.h"

namespace jem {
namespace {
constexpr uint32_t kDescriptorMagic = 0x444d454a;  // "JEMD"
}  // namespace

Bytes RemoteRegion::Serialize() const {
  ByteWriter w(kDescriptorMagic);
  w.U64(base);
  w.U64(length);
  w.U32(static_cast<uint32_t>(keys.size()));
  for (uint64_t k : keys) w.U64(k);
  return w.Take();
}

RemoteRegion RemoteRegion::Parse(const Bytes& descriptor) {
  ByteReader r(descriptor, kDescriptorMagic, "region descriptor");
  RemoteRegion out;
  out.base = r.U64();
  out.length = r.U64();
  out.keys.resize(r.U32());
  if (out.keys.empty()) throw Error("region descriptor is malformed (no keys)");
  for (uint64_t& k : out.keys) k = r.U64();
  r.End();
  return out;
}

MemoryRegion::MemoryRegion(const std::vector<std::unique_ptr<FabricDomain>>& domains, void* ptr,
                           size_t length, MemoryKind kind, int cuda_device, uint32_t id)
    : id_(id), base_(static_cast<uint8_t*>(ptr)), length_(length) {
  if (ptr == nullptr || length == 0) throw Error("cannot register an empty buffer");
  try {
    for (const auto& d : domains) {
      fid_mr* mr = d->Register(ptr, length, kind, cuda_device, id);
      mrs_.push_back(mr);
      descs_.push_back(d->needs_local_desc(kind) ? fi_mr_desc(mr) : nullptr);
    }
  } catch (...) {
    for (fid_mr* mr : mrs_) fi_close(&mr->fid);
    throw;
  }
}

MemoryRegion::~MemoryRegion() {
  for (fid_mr* mr : mrs_) fi_close(&mr->fid);
}

RemoteRegion MemoryRegion::Remote() const {
  RemoteRegion r;
  r.base = reinterpret_cast<uint64_t>(base_);
  r.length = length_;
  for (fid_mr* mr : mrs_) r.keys.push_back(fi_mr_key(mr));
  return r;
}

}  // namespace jem
