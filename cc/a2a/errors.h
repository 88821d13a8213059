// The protocol's exceptions, one class per kind of misuse, for both platforms. The FFI layer
// turns each into one error code (cc/ffi/handler_checks.h); the Python bindings see jem::Error.
#pragma once

#include "cc/transfer_engine/api.h"

namespace jem {

// Input a user can fix (shapes, dtypes, expert ids, num_tokens, capacity, halves called out
// of order): reported as an invalid argument rather than an internal error.
class InputError : public Error {
 public:
  using Error::Error;
};

// An id that names no context here: closed, or created in another process or for another GPU.
class ContextNotFound : public Error {
 public:
  using Error::Error;
};

// A context that cannot run a step now: not connected yet, or failed earlier.
class ContextUnusable : public Error {
 public:
  using Error::Error;
};

}  // namespace jem
