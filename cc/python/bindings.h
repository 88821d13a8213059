// Pieces of the nanobind module, one per layer they expose.
#pragma once

#include <nanobind/nanobind.h>

namespace jem {

// TransferEngine: engines, registrations, peer groups, scatter, barrier, immediate waits.
void BindEngine(nanobind::module_& m);
// All-to-all contexts and the XLA FFI handler capsules for platform "cpu".
void BindAllToAll(nanobind::module_& m);
#if defined(JEM_WITH_CUDA)
// GPU contexts and the XLA FFI handler capsules for platform "CUDA".
void BindCuda(nanobind::module_& m);
#endif

}  // namespace jem
