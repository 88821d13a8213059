// Little-endian byte encoding of what ranks exchange (addresses, descriptors). Readers check
// every length so that bytes from a wrong source become a clear Error, not a crash.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "cc/transfer_engine/api.h"

namespace jem {

class ByteWriter {
 public:
  explicit ByteWriter(uint32_t magic) { U32(magic); }
  void U32(uint32_t v) { Raw(&v, sizeof v); }
  void U64(uint64_t v) { Raw(&v, sizeof v); }
  void Blob(const Bytes& b) {
    U32(static_cast<uint32_t>(b.size()));
    Raw(b.data(), b.size());
  }
  Bytes Take() { return std::move(out_); }

 private:
  void Raw(const void* p, size_t n) {
    auto* c = static_cast<const uint8_t*>(p);
    out_.insert(out_.end(), c, c + n);
  }
  Bytes out_;
};

class ByteReader {
 public:
  // `what` names the thing being parsed in error messages.
  ByteReader(const Bytes& in, uint32_t magic, std::string what) : in_(in), what_(std::move(what)) {
    if (U32() != magic) throw Error(what_ + " is malformed (wrong magic): pass bytes it produced");
  }
  uint32_t U32() {
    uint32_t v;
    Raw(&v, sizeof v);
    return v;
  }
  uint64_t U64() {
    uint64_t v;
    Raw(&v, sizeof v);
    return v;
  }
  Bytes Blob() {
    uint32_t n = U32();
    Need(n);
    Bytes b(in_.begin() + pos_, in_.begin() + pos_ + n);
    pos_ += n;
    return b;
  }
  void End() const {
    if (pos_ != in_.size()) throw Error(what_ + " is malformed (trailing bytes)");
  }

 private:
  void Need(size_t n) const {
    if (in_.size() - pos_ < n) throw Error(what_ + " is malformed (truncated)");
  }
  void Raw(void* p, size_t n) {
    Need(n);
    std::memcpy(p, in_.data() + pos_, n);
    pos_ += n;
  }
  const Bytes& in_;
  std::string what_;
  size_t pos_ = 0;
};

}  // namespace jem
