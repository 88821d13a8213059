// The XLA FFI handlers for platform "CUDA", one per target of cc/ffi/targets.h
// (Jem<Name>Cuda).
#pragma once

#include "cc/ffi/targets.h"
#include "xla/ffi/api/api.h"
#include "xla/ffi/api/c_api.h"

#define JEM_DECLARE_CUDA_HANDLER(Name, python_name) \
  XLA_FFI_DECLARE_HANDLER_SYMBOL(Jem##Name##Cuda);
JEM_FFI_TARGETS(JEM_DECLARE_CUDA_HANDLER)
#undef JEM_DECLARE_CUDA_HANDLER
