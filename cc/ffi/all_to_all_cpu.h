// The XLA FFI handlers for platform "cpu", one per target of cc/ffi/README.md. The Python
// module hands them out as capsules for jax.ffi.register_ffi_target.
#pragma once

#include "xla/ffi/api/api.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JemDispatchSendCpu);  // jem_dispatch_send
XLA_FFI_DECLARE_HANDLER_SYMBOL(JemDispatchRecvCpu);  // jem_dispatch_recv
XLA_FFI_DECLARE_HANDLER_SYMBOL(JemDispatchCpu);      // jem_dispatch
XLA_FFI_DECLARE_HANDLER_SYMBOL(JemCombineSendCpu);   // jem_combine_send
XLA_FFI_DECLARE_HANDLER_SYMBOL(JemCombineRecvCpu);   // jem_combine_recv
XLA_FFI_DECLARE_HANDLER_SYMBOL(JemCombineCpu);       // jem_combine
