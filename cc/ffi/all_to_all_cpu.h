// The XLA FFI handlers for platform "cpu", one per target of cc/ffi/targets.h
// (Jem<Name>Cpu). The Python module hands them out as capsules for
// jax.ffi.register_ffi_target.
#pragma once

#include "cc/ffi/targets.h"
#include "xla/ffi/api/api.h"

#define JEM_DECLARE_CPU_HANDLER(Name, python_name) \
  XLA_FFI_DECLARE_HANDLER_SYMBOL(Jem##Name##Cpu);
JEM_FFI_TARGETS(JEM_DECLARE_CPU_HANDLER)
#undef JEM_DECLARE_CPU_HANDLER
