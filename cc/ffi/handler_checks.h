// Checks shared by the CPU and CUDA handlers: operand shapes and dtypes against the layout,
// and the mapping of the protocol's exceptions to ffi::Error.
#pragma once

#include <cstdint>
#include <exception>
#include <initializer_list>
#include <string>

#include "cc/a2a/all_to_all_context.h"
#include "cc/ffi/ffi_types.h"

namespace jem {

inline std::string DimsText(ffi::Span<const int64_t> dims) {
  std::string text = "[";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return text + "]";
}

// Empty when `dims` equals `expected`, else a sentence naming the operand.
inline std::string CheckDims(const char* name, ffi::Span<const int64_t> dims,
                             std::initializer_list<int64_t> expected) {
  bool same = dims.size() == expected.size();
  size_t i = 0;
  for (int64_t e : expected) same = same && dims[i++] == e;
  if (same) return {};
  std::string want = "[";
  i = 0;
  for (int64_t e : expected) want += (i++ ? ", " : "") + std::to_string(e);
  return std::string(name) + " has shape " + DimsText(dims) + ", expected " + want + "]";
}

// Bytes per element of the dtypes the layout carries: 0 for any other dtype.
inline int32_t ElementBytes(ffi::DataType dtype) {
  switch (dtype) {
    case ffi::DataType::F8E4M3FN: return 1;
    case ffi::DataType::BF16: return 2;
    case ffi::DataType::F32: return 4;
    default: return 0;
  }
}

inline std::string CheckElementBytes(const char* name, ffi::DataType dtype, int32_t expected) {
  if (ElementBytes(dtype) == expected) return {};
  return std::string(name) + " has the wrong dtype for this AllToAll (expected " +
         std::to_string(expected) + "-byte elements of float8_e4m3fn, bfloat16 or float32)";
}

// The first non-empty problem of a list, as an InvalidArgument error.
inline ffi::Error FirstProblem(std::initializer_list<std::string> problems) {
  for (const std::string& p : problems) {
    if (!p.empty()) return ffi::Error::InvalidArgument(p + ".");
  }
  return ffi::Error::Success();
}

// The protocol's exceptions as FFI errors: bad input is the caller's to fix, the rest is not.
inline ffi::Error ToFfiError(const std::exception& e) {
  if (dynamic_cast<const InputError*>(&e) != nullptr) {
    return ffi::Error::InvalidArgument(e.what());
  }
  return ffi::Error::Internal(e.what());
}

}  // namespace jem
