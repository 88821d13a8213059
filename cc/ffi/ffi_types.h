// The XLA FFI API under a short name for the handlers. Every target binds its buffers as
// RemainingArgs / RemainingRets and reads them through handler_checks.h.
#pragma once

#include "xla/ffi/api/ffi.h"

namespace jem {

namespace ffi = ::xla::ffi;

}  // namespace jem
