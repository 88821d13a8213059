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
                       const std::vector<int>& devices, double timeout_s, bool zero_unused_rows,
                       const std::vector<uint64_t>& fabric_masks, const std::string& provider,
                       int num_domains, const std::vector<std::string>& nic_names,
                       bool stage_in_host, int max_sms) {
  if (ranks.empty() || ranks.size() != devices.size()) {
    throw Error("ranks and devices must be non-empty lists of the same length.");
  }
  if (!fabric_masks.empty() && fabric_masks.size() != ranks.size()) {
    throw Error("fabric_masks needs one entry per local rank.");
  }
  std::vector<std::unique_ptr<NvlinkContext>> contexts;
  for (size_t i = 0; i < ranks.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (devices[j] == devices[i] || ranks[j] == ranks[i]) {
        throw Error("each local rank needs its own GPU and its own rank number.");
      }
    }
    FabricOptions fabric;
    fabric.mask = fabric_masks.empty() ? 0 : fabric_masks[i];
    fabric.engine.provider = provider;
    fabric.engine.num_domains = num_domains;
    fabric.engine.nic_names = nic_names;
    fabric.stage_in_host = stage_in_host;
    contexts.push_back(std::make_unique<NvlinkContext>(layout, ranks[i], devices[i], timeout_s,
                                                       zero_unused_rows, max_sms, fabric));
  }
  return RegisterNvlinkContexts(std::move(contexts));
}

nb::bytes ToPython(const Bytes& b) {
  return nb::bytes(reinterpret_cast<const char*>(b.data()), b.size());
}

Bytes FromPython(const nb::bytes& b) {
  const auto* p = static_cast<const uint8_t*>(b.data());
  return Bytes(p, p + b.size());
}

// Per local rank, what the other ranks need to reach it (see the binding's doc).
std::vector<nb::tuple> Endpoints(int64_t id) {
  std::vector<nb::tuple> out;
  for (const auto& c : Contexts(id)) {
    out.push_back(nb::make_tuple(ToPython(c->IpcHandle()), c->PciAddress(),
                                 ToPython(c->FabricAddress()), ToPython(c->FabricDescriptor()),
                                 c->FabricStaged(), c->FabricProvider()));
  }
  return out;
}

void Connect(int64_t id, const std::vector<nb::bytes>& handles,
             const std::vector<std::string>& gpus,
             const std::vector<nb::bytes>& fabric_addresses,
             const std::vector<nb::bytes>& fabric_descriptors) {
  auto contexts = Contexts(id);
  const int R = contexts.front()->layout().num_ranks;
  if (static_cast<int>(handles.size()) != R) {
    throw Error("connect needs the IPC handles of all " + std::to_string(R) + " ranks.");
  }
  if (fabric_addresses.size() != fabric_descriptors.size() ||
      (!fabric_addresses.empty() && static_cast<int>(fabric_addresses.size()) != R)) {
    throw Error("connect needs the fabric addresses and descriptors of all " +
                std::to_string(R) + " ranks, or none.");
  }
  std::vector<NvlinkContext*> local(R, nullptr);
  for (const auto& c : contexts) local[c->rank()] = c.get();
  std::vector<Bytes> raw;
  for (const nb::bytes& h : handles) raw.push_back(FromPython(h));
  std::vector<PeerSpec> fabric;
  for (size_t r = 0; r < fabric_addresses.size(); ++r) {
    fabric.push_back({FromPython(fabric_addresses[r]), FromPython(fabric_descriptors[r])});
  }
  for (const auto& c : contexts) c->Connect(local, raw, gpus, fabric);
}

void Synchronize(int64_t id) {
  for (const auto& c : Contexts(id)) c->Synchronize();
}

std::vector<std::string> Failures(int64_t id) {
  std::vector<std::string> out;
  for (const auto& c : Contexts(id)) out.push_back(c->Failure());
  return out;
}

nb::dict PhaseTimes(const FabricPhaseTimes& t) {
  nb::dict d;
  d["steps"] = t.steps;
  d["post_ns"] = t.post_ns;
  d["data_wait_ns"] = t.data_wait_ns;
  d["credit_wait_ns"] = t.credit_wait_ns;
  return d;
}

nb::list ProxyTimes(int64_t id) {
  nb::list out;
  for (const auto& c : Contexts(id)) {
    const FabricTimes t = c->ProxyTimes();
    nb::dict d;
    d["dispatch"] = PhaseTimes(t.dispatch);
    d["combine"] = PhaseTimes(t.combine);
    out.append(d);
  }
  return out;
}

int DeviceSms(int device) {
  int n = 0;
  CheckCuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device),
            "cudaDeviceGetAttribute");
  return n;
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
  m.def("cuda_device_sms", &DeviceSms, nb::arg("device"),
        "The streaming multiprocessors (SMs) of CUDA device `device` of this process.");
  m.def("cuda_context_create", &CreateContexts, nb::arg("layout"), nb::arg("ranks"),
        nb::arg("devices"), nb::arg("timeout_s"), nb::arg("zero_unused_rows") = true,
        nb::arg("fabric_masks") = std::vector<uint64_t>(), nb::arg("provider") = "",
        nb::arg("num_domains") = 1, nb::arg("nic_names") = std::vector<std::string>(),
        nb::arg("stage_in_host") = false, nb::arg("max_sms") = 0,
        "Allocates one GPU context per (rank, GPU) of this process; returns their id. "
        "fabric_masks[i]: bit r set = local rank i reaches rank r through the fabric "
        "(provider, num_domains NICs, nic_names to choose them; stage_in_host keeps the "
        "fabric buffer in pinned host memory even where the provider registers GPU memory). "
        "max_sms bounds the SMs each kernel occupies (0: every SM).");
  m.def("cuda_context_endpoints", &Endpoints, nb::arg("id"),
        "Per local rank, in rank order: (CUDA IPC handle of its arena, PCI address of its GPU, "
        "fabric address, fabric buffer descriptor, staged in host memory, provider); empty "
        "fabric bytes without fabric peers.");
  m.def("cuda_context_connect", &Connect, nb::arg("id"), nb::arg("handles"), nb::arg("gpus"),
        nb::arg("fabric_addresses") = std::vector<nb::bytes>(),
        nb::arg("fabric_descriptors") = std::vector<nb::bytes>(),
        "Maps every NVLink peer's arena and reaches every fabric peer (lists of all ranks in "
        "rank order; this process's own entries are not used), then starts the proxies.");
  m.def("cuda_context_failures", &Failures, nb::arg("id"),
        "Per local rank, the first error its kernels reported ('' if none). Reads mapped "
        "memory: call it after block_until_ready.");
  m.def("cuda_context_proxy_times", &ProxyTimes, nb::arg("id"),
        "Per local rank, where its fabric steps spent their time on the proxy thread, summed "
        "(cc/a2a/fabric_proxy.h FabricPhaseTimes): {'dispatch': {...}, 'combine': {...}}.");
  m.def("cuda_context_synchronize", &Synchronize, nb::arg("id"),
        "Waits for every kernel queued on this process's GPUs of the context.");
  m.def("cuda_context_destroy", &RemoveNvlinkContexts, nb::arg("id"),
        "Frees the contexts once their queued kernels have finished.");
  m.def("cuda_registrations", []() {
    nb::dict d;
#define JEM_CUDA_CAPSULE(Name, python_name) \
  d[python_name] = nb::capsule(reinterpret_cast<void*>(&Jem##Name##Cuda));
    JEM_FFI_TARGETS(JEM_CUDA_CAPSULE)
#undef JEM_CUDA_CAPSULE
    return d;
  }, "XLA FFI handler capsules for platform 'CUDA', by target name.");
}

}  // namespace jem
