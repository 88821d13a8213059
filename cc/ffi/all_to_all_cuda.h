// XLA FFI handlers of the all-to-all targets (cc/ffi/README.md) for platform "CUDA".
#pragma once

#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/api.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JemDispatchSendCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JemDispatchRecvCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JemDispatchCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JemCombineSendCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JemCombineRecvCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JemCombineCuda);
