// Short names for the XLA FFI types the handlers use, so that signatures stay readable.
#pragma once

#include "xla/ffi/api/ffi.h"

namespace jem {

namespace ffi = ::xla::ffi;

using AnyBuffer = ffi::AnyBuffer;                 // operand of a dtype chosen at set-up
using AnyResult = ffi::Result<ffi::AnyBuffer>;    // result of a dtype chosen at set-up
using I32Buffer = ffi::Buffer<ffi::S32>;
using F32Buffer = ffi::Buffer<ffi::F32>;
using I32Result = ffi::ResultBuffer<ffi::S32>;
using F32Result = ffi::ResultBuffer<ffi::F32>;

}  // namespace jem
