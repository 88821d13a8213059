// GPU contexts of the NVLink path and the XLA FFI handler capsules for platform "CUDA".
// Nothing here touches the GPU at import: the functions do, when called.
#include <cuda_runtime.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <memory>
#include <string>
#include <vector>

#include "cc/a2a/nvlink_registry.h"
#include "cc/ffi/all_to_all_cuda.h"
#include "cc/python/bindings.h"

namespace nb = nanobind;

namespace jem {
namespace {

std::vector<std::shared_ptr<NvlinkContext>> Contexts(int64_t id) {
  auto contexts = FindNvlinkContexts(id);
  if (contexts.empty()) throw Error("no CUDA all-to-all context " + std::to_string(id) + ".");
  return contexts;
}

int64_t CreateContexts(const Layout& layout, const std::vector<int>& ranks,
                       const std::vector<int>& devices, double timeout_s, bool zero_unused_rows) {
  if (ranks.empty() || ranks.size() != devices.size()) {
    throw Error("ranks and devices must be non-empty lists of the same length.");
  }
  std::vector<std::unique_ptr<NvlinkContext>> contexts;
  for (size_t i = 0; i < ranks.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (devices[j] == devices[i] || ranks[j] == ranks[i]) {
        throw Error("each local rank needs its own GPU and its own rank number.");
      }
    }
    contexts.push_back(std::make_unique<NvlinkContext>(layout, ranks[i], devices[i], timeout_s,
                                                       zero_unused_rows));
  }
  return RegisterNvlinkContexts(std::move(contexts));
}

std::vector<nb::bytes> IpcHandles(int64_t id) {
  std::vector<nb::bytes> out;
  for (const auto& c : Contexts(id)) {
    const Bytes h = c->IpcHandle();
    out.emplace_back(reinterpret_cast<const char*>(h.data()), h.size());
  }
  return out;
}

void Connect(int64_t id, const std::vector<nb::bytes>& handles) {
  auto contexts = Contexts(id);
  const int R = contexts.front()->layout().num_ranks;
  if (static_cast<int>(handles.size()) != R) {
    throw Error("connect needs the IPC handles of all " + std::to_string(R) + " ranks.");
  }
  std::vector<NvlinkContext*> local(R, nullptr);
  for (const auto& c : contexts) local[c->rank()] = c.get();
  std::vector<Bytes> raw;
  for (const nb::bytes& h : handles) {
    const auto* p = static_cast<const uint8_t*>(h.data());
    raw.emplace_back(p, p + h.size());
  }
  for (const auto& c : contexts) c->Connect(local, raw);
}

void Synchronize(int64_t id) {
  for (const auto& c : Contexts(id)) c->Synchronize();
}

std::vector<std::string> Failures(int64_t id) {
  std::vector<std::string> out;
  for (const auto& c : Contexts(id)) out.push_back(c->Failure());
  return out;
}

int DeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

}  // namespace

void BindCuda(nb::module_& m) {
  m.def("cuda_device_count", &DeviceCount,
        "GPUs this process can use (0 without a driver or a GPU).");
  m.def("cuda_context_create", &CreateContexts, nb::arg("layout"), nb::arg("ranks"),
        nb::arg("devices"), nb::arg("timeout_s"), nb::arg("zero_unused_rows") = true,
        "Allocates one NVLink context per (rank, GPU) of this process; returns their id.");
  m.def("cuda_context_ipc_handles", &IpcHandles, nb::arg("id"),
        "The CUDA IPC handles of this process's ranks' arenas, in rank order.");
  m.def("cuda_context_connect", &Connect, nb::arg("id"), nb::arg("handles"),
        "Maps every rank's arena (handles of all ranks in rank order; this process's own "
        "entries are not used).");
  m.def("cuda_context_failures", &Failures, nb::arg("id"),
        "Per local rank, the first error its kernels reported ('' if none). Reads mapped "
        "memory: call it after block_until_ready.");
  m.def("cuda_context_synchronize", &Synchronize, nb::arg("id"),
        "Waits for every kernel queued on this process's GPUs of the context.");
  m.def("cuda_context_destroy", &RemoveNvlinkContexts, nb::arg("id"),
        "Frees the contexts once their queued kernels have finished.");
  m.def("cuda_registrations", []() {
    nb::dict d;
    d["jem_dispatch_send"] = nb::capsule(reinterpret_cast<void*>(&JemDispatchSendCuda));
    d["jem_dispatch_recv"] = nb::capsule(reinterpret_cast<void*>(&JemDispatchRecvCuda));
    d["jem_dispatch"] = nb::capsule(reinterpret_cast<void*>(&JemDispatchCuda));
    d["jem_combine_send"] = nb::capsule(reinterpret_cast<void*>(&JemCombineSendCuda));
    d["jem_combine_recv"] = nb::capsule(reinterpret_cast<void*>(&JemCombineRecvCuda));
    d["jem_combine"] = nb::capsule(reinterpret_cast<void*>(&JemCombineCuda));
    return d;
  }, "XLA FFI handler capsules for platform 'CUDA', by target name.");
}

}  // namespace jem
