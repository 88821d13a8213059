// The extension module jax_efa_moe._jem.
#include "cc/python/bindings.h"

NB_MODULE(_jem, m) {
  m.doc() = "jax_efa_moe native core: TransferEngine, all-to-all contexts, XLA FFI handlers";
#if defined(JEM_WITH_CUDA)
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
  jem::BindEngine(m);
  jem::BindAllToAll(m);
}
