// All-to-all contexts for Python (create, connect through the bootstrap, destroy) and the
// capsules of the "cpu" FFI handlers for jax.ffi.register_ffi_target. Errors reach Python
// through the engine bindings' translator (jem::Error -> RuntimeError, TimeoutError).
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cc/a2a/all_to_all_context.h"
#include "cc/a2a/context_registry.h"
#include "cc/base/layout.h"
#include "cc/ffi/all_to_all_cpu.h"
#include "cc/python/bindings.h"

namespace nb = nanobind;

namespace jem {
namespace {

nb::bytes ToPython(const Bytes& bytes) {
  return nb::bytes(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

Bytes FromPython(const nb::bytes& bytes) {
  const auto* data = static_cast<const uint8_t*>(bytes.data());
  return Bytes(data, data + bytes.size());
}

std::shared_ptr<AllToAllContext> Get(int64_t id) {
  std::shared_ptr<AllToAllContext> ctx = FindContext(id);
  if (!ctx) throw nb::value_error(("no all-to-all context with id " + std::to_string(id)).c_str());
  return ctx;
}

template <typename Fn>
nb::capsule Capsule(Fn* handler) {
  return nb::capsule(reinterpret_cast<void*>(handler));
}

}  // namespace

void BindAllToAll(nb::module_& m) {
  nb::class_<Layout>(m, "Layout", "The all-to-all buffer layout (cc/base/layout.h).")
      .def(nb::init<>())
      .def_rw("num_ranks", &Layout::num_ranks)
      .def_rw("num_experts", &Layout::num_experts)
      .def_rw("experts_per_token", &Layout::experts_per_token)
      .def_rw("hidden", &Layout::hidden)
      .def_rw("max_tokens", &Layout::max_tokens)
      .def_rw("max_recv_tokens", &Layout::max_recv_tokens)
      .def_rw("expert_alignment", &Layout::expert_alignment)
      .def_rw("dispatch_elem_bytes", &Layout::dispatch_elem_bytes)
      .def_rw("combine_elem_bytes", &Layout::combine_elem_bytes)
      .def_rw("has_scales", &Layout::has_scales)
      .def("local_experts", &Layout::local_experts)
      .def("num_scales", &Layout::num_scales)
      .def("max_recv_records", &Layout::max_recv_records)
      .def("send_capacity", &Layout::send_capacity)
      .def("private_records", &Layout::private_records)
      .def("record_bytes", &Layout::record_bytes)
      .def("arena_bytes", &Layout::arena_bytes)
      .def_static("default_max_recv_tokens", &Layout::DefaultMaxRecvTokens, nb::arg("num_ranks"),
                  nb::arg("num_experts"), nb::arg("experts_per_token"), nb::arg("max_tokens"),
                  nb::arg("expert_alignment"));

  m.def(
      "create_context",
      [](const std::string& provider, int rank, const Layout& layout, double timeout_s,
         int num_domains, int pin_cpu, bool busy_poll) {
        EngineOptions options;
        options.provider = provider;
        options.num_domains = num_domains;
        options.pin_cpu = pin_cpu;
        options.busy_poll = busy_poll;
        std::unique_ptr<AllToAllContext> ctx;
        {
          nb::gil_scoped_release release;
          ctx = std::make_unique<AllToAllContext>(options, layout, rank, timeout_s);
        }
        return RegisterContext(std::move(ctx));
      },
      nb::arg("provider"), nb::arg("rank"), nb::arg("layout"), nb::arg("timeout_s"),
      nb::arg("num_domains") = 1, nb::arg("pin_cpu") = -1, nb::arg("busy_poll") = false,
      "Creates this rank's all-to-all context (its own engine on `provider`, the arena "
      "allocated and registered once); returns its id, the `context` attribute of every "
      "custom call.");
  m.def(
      "context_address", [](int64_t id) { return ToPython(Get(id)->Address()); }, nb::arg("id"),
      "The engine address other ranks need to reach this context.");
  m.def(
      "context_descriptor", [](int64_t id) { return ToPython(Get(id)->ArenaDescriptor()); },
      nb::arg("id"), "The remote descriptor of this context's arena.");
  m.def(
      "connect_context",
      [](int64_t id, const std::vector<nb::bytes>& addresses,
         const std::vector<nb::bytes>& descriptors) {
        if (addresses.size() != descriptors.size()) {
          throw nb::value_error("connect_context needs as many descriptors as addresses");
        }
        std::vector<PeerSpec> ranks;
        for (size_t r = 0; r < addresses.size(); ++r) {
          ranks.push_back({FromPython(addresses[r]), FromPython(descriptors[r])});
        }
        std::shared_ptr<AllToAllContext> ctx = Get(id);
        nb::gil_scoped_release release;
        ctx->Connect(ranks);
      },
      nb::arg("id"), nb::arg("addresses"), nb::arg("descriptors"),
      "Joins every rank's context: addresses and descriptors of all ranks, in rank order.");
  m.def(
      "context_steps",
      [](int64_t id) {
        std::shared_ptr<AllToAllContext> ctx = Get(id);
        std::lock_guard<std::mutex> lock(ctx->step_mutex());
        return std::make_pair(ctx->dispatch.steps, ctx->combine.steps);
      },
      nb::arg("id"), "(dispatch steps, combine steps) completed by this context.");
  m.def(
      "destroy_context",
      [](int64_t id) {
        nb::gil_scoped_release release;
        return RemoveContext(id);
      },
      nb::arg("id"), "Releases a context; returns whether it existed.");
  m.def(
      "registrations",
      [] {
        nb::dict targets;
#define JEM_CPU_CAPSULE(Name, python_name) \
  targets[python_name] = Capsule(Jem##Name##Cpu);
        JEM_FFI_TARGETS(JEM_CPU_CAPSULE)
#undef JEM_CPU_CAPSULE
        return targets;
      },
      "The XLA FFI handlers for platform \"cpu\", by target name.");
}

}  // namespace jem
