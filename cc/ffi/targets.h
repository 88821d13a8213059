// The custom-call targets of cc/ffi/README.md, listed once: X(Name, "python name").
// Each platform declares and defines a handler symbol Jem<Name><Platform> per entry, and the
// Python module registers them under these names; a new target is one line here (and its
// groups in operands.h, its Run per platform, its wrapper in jax_efa_moe/ops.py).
#pragma once

#define JEM_FFI_TARGETS(X)             \
  X(DispatchSend, "jem_dispatch_send") \
  X(DispatchRecv, "jem_dispatch_recv") \
  X(Dispatch, "jem_dispatch")          \
  X(CombineSend, "jem_combine_send")   \
  X(CombineRecv, "jem_combine_recv")   \
  X(Combine, "jem_combine")
