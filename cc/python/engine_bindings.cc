// Python view of the TransferEngine: engines, registrations of NumPy arrays, peer groups,
// scatter/barrier and waits. Waits release the GIL; jem::TimeoutError becomes TimeoutError
// and jem::Error RuntimeError.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "cc/python/bindings.h"
#include "cc/transfer_engine/api.h"
#include "cc/transfer_engine/fabric_domain.h"

namespace nb = nanobind;

namespace jem {
namespace {

Bytes ToBytes(const nb::bytes& b) {
  auto* p = static_cast<const uint8_t*>(b.data());
  return Bytes(p, p + b.size());
}

nb::bytes FromBytes(const Bytes& b) {
  return nb::bytes(reinterpret_cast<const char*>(b.data()), b.size());
}

class PyEngine {
 public:
  explicit PyEngine(const EngineOptions& options) {
    nb::gil_scoped_release release;
    engine_ = TransferEngine::Create(options);
  }

  TransferEngine& engine() { return *shared(); }
  // Calls that release the GIL hold a reference, so a close() from another thread cannot
  // destroy the engine under them; it goes when the last such call returns.
  std::shared_ptr<TransferEngine> shared() {
    if (!engine_) throw Error("the engine is closed");
    return engine_;
  }

  // Registered arrays stay alive while registered: remote peers may write into them.
  MemoryRegionId Register(nb::object array, size_t* nbytes_out) {
    using HostArray = nb::ndarray<nb::c_contig, nb::device::cpu>;
    HostArray view;
    if (!nb::try_cast<HostArray>(array, view, /*convert=*/false)) {
      throw nb::type_error("register() takes a writable, C-contiguous NumPy array in host memory");
    }
    void* data = view.data();
    size_t nbytes = view.nbytes();
    if (nbytes == 0) throw nb::value_error("register() cannot register an empty array");
    *nbytes_out = nbytes;
    std::shared_ptr<TransferEngine> e = shared();
    MemoryRegionId id;
    {
      nb::gil_scoped_release release;
      id = e->RegisterMemory(data, nbytes, MemoryKind::kHost);
    }
    arrays_.emplace(id.value, std::move(array));
    return id;
  }

  void Deregister(MemoryRegionId id) {
    std::shared_ptr<TransferEngine> e = shared();
    {
      nb::gil_scoped_release release;
      e->DeregisterMemory(id);
    }
    arrays_.erase(id.value);
  }

  void Close() {
    std::shared_ptr<TransferEngine> last = std::move(engine_);
    {
      nb::gil_scoped_release release;
      last.reset();
    }
    arrays_.clear();
  }

 private:
  std::shared_ptr<TransferEngine> engine_;
  std::unordered_map<uint32_t, nb::object> arrays_;
};

// A registration handle; the engine owns the registration (and keeps the array alive).
struct PyRegion {
  nb::object engine;  // the PyEngine it belongs to
  MemoryRegionId id;
  size_t nbytes = 0;
};

PyEngine& EngineOf(nb::handle engine) { return nb::cast<PyEngine&>(engine); }

MemoryRegionId RegionOf(nb::handle self, const PyRegion& region) {
  if (!region.engine.is(self)) {
    throw nb::value_error("the region was registered with a different engine");
  }
  return region.id;
}

WriteSpec ToWrite(int64_t peer, int64_t src, int64_t dst, int64_t len) {
  if (peer < 0 || src < 0 || dst < 0 || len < 0 || peer > UINT32_MAX) {
    throw nb::value_error(("a write (peer, src_offset, dst_offset, length) = (" +
                           std::to_string(peer) + ", " + std::to_string(src) + ", " +
                           std::to_string(dst) + ", " + std::to_string(len) +
                           ") has a negative or out-of-range field")
                              .c_str());
  }
  return WriteSpec{static_cast<uint32_t>(peer), static_cast<uint64_t>(src),
                   static_cast<uint64_t>(dst), static_cast<uint64_t>(len)};
}

// writes: an int64 array [n, 4] or a sequence of (peer, src_offset, dst_offset, length).
std::vector<WriteSpec> ToWrites(nb::handle writes) {
  using Table = nb::ndarray<const int64_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
  std::vector<WriteSpec> out;
  Table table;
  if (nb::try_cast<Table>(writes, table, /*convert=*/false)) {
    if (table.shape(1) != 4) {
      throw nb::value_error("writes array must have shape [n, 4]: peer, src_offset, "
                            "dst_offset, length");
    }
    const int64_t* v = table.data();
    for (size_t i = 0; i < table.shape(0); ++i, v += 4) {
      out.push_back(ToWrite(v[0], v[1], v[2], v[3]));
    }
    return out;
  }
  if (!nb::isinstance<nb::sequence>(writes)) {
    throw nb::type_error("writes must be an int64 array [n, 4] or a list of "
                         "(peer, src_offset, dst_offset, length) tuples");
  }
  for (nb::handle item : writes) {
    if (!nb::isinstance<nb::sequence>(item) || nb::len(item) != 4) {
      throw nb::type_error("each write must be a (peer, src_offset, dst_offset, length) tuple");
    }
    nb::sequence t = nb::borrow<nb::sequence>(item);
    out.push_back(ToWrite(nb::cast<int64_t>(t[0]), nb::cast<int64_t>(t[1]),
                          nb::cast<int64_t>(t[2]), nb::cast<int64_t>(t[3])));
  }
  return out;
}

}  // namespace

void BindEngine(nb::module_& m) {
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const TimeoutError& e) {
      PyErr_SetString(PyExc_TimeoutError, e.what());
    } catch (const Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  m.def("providers", &AvailableProviders,
        "libfabric providers offering FI_EP_RDM endpoints with RMA writes on this machine.");

  nb::class_<PyRegion>(m, "Region", "A NumPy array registered with an Engine.")
      .def_ro("nbytes", &PyRegion::nbytes)
      .def_prop_ro("id", [](const PyRegion& r) { return r.id.value; })
      .def(
          "descriptor",
          [](const PyRegion& r) { return FromBytes(EngineOf(r.engine).engine().Descriptor(r.id)); },
          "Bytes a peer needs to write into this region (base, length, one key per domain).");

  nb::class_<PyEngine>(m, "Engine",
                       "A TransferEngine: libfabric domains driven by one proxy thread.")
      .def(
          "__init__",
          [](PyEngine* self, const std::string& provider, int num_domains, int pin_cpu,
             bool busy_poll, int cuda_device, uint64_t reorder_seed, uint64_t max_write_bytes,
             const std::string& gpu_pci_address, const std::vector<std::string>& nic_names) {
            EngineOptions o;
            o.provider = provider;
            o.num_domains = num_domains;
            o.pin_cpu = pin_cpu;
            o.busy_poll = busy_poll;
            o.cuda_device = cuda_device;
            o.reorder_seed = reorder_seed;
            o.max_write_bytes = max_write_bytes;
            o.gpu_pci_address = gpu_pci_address;
            o.nic_names = nic_names;
            new (self) PyEngine(o);
          },
          nb::kw_only(), nb::arg("provider") = "tcp;ofi_rxm", nb::arg("num_domains") = 1,
          nb::arg("pin_cpu") = -1, nb::arg("busy_poll") = false, nb::arg("cuda_device") = -1,
          nb::arg("reorder_seed") = 0, nb::arg("max_write_bytes") = 0,
          nb::arg("gpu_pci_address") = "", nb::arg("nic_names") = std::vector<std::string>(),
          "reorder_seed != 0 (or the environment variable JEM_REORDER_SEED) turns on a test "
          "mode that delivers arrivals and completions in a random order, as EFA may. "
          "max_write_bytes > 0 caps one RDMA write below the provider's limit: longer writes "
          "are split (still one immediate each). With several NICs, domains open nic_names in "
          "turn, else the NICs nearest gpu_pci_address first, else the provider's order.")
      .def_prop_ro("provider", [](PyEngine& e) { return e.engine().Provider(); })
      .def_prop_ro("num_domains", [](PyEngine& e) { return e.engine().NumDomains(); })
      .def("domain_name", [](PyEngine& e, int index) { return e.engine().DomainName(index); },
           nb::arg("index"), "libfabric's name of domain `index` (the NIC).")
      .def(
          "peer_domain",
          [](PyEngine& e, uint32_t group, uint32_t peer) {
            return e.engine().PeerDomain(PeerGroupId{group}, peer);
          },
          nb::arg("group"), nb::arg("peer"),
          "The domain through which the group's peer is reached.")
      .def_prop_ro("supports_cuda_memory",
                   [](PyEngine& e) { return e.engine().SupportsCudaMemory(); })
      .def("address", [](PyEngine& e) { return FromBytes(e.engine().Address()); },
           "Serialized endpoint names of all domains, for peers' add_peer_group.")
      .def(
          "register",
          [](nb::handle self, nb::object array) {
            PyEngine& e = EngineOf(self);
            PyRegion r;
            r.engine = nb::borrow(self);
            r.id = e.Register(std::move(array), &r.nbytes);
            return r;
          },
          nb::arg("array"),
          "Registers a writable C-contiguous array; it stays alive while registered.")
      .def(
          "deregister",
          [](nb::handle self, const PyRegion& region) {
            EngineOf(self).Deregister(RegionOf(self, region));
          },
          nb::arg("region"))
      .def(
          "add_peer_group",
          [](nb::handle self, const PyRegion& region, nb::sequence peers) {
            std::vector<PeerSpec> specs;
            for (nb::handle p : peers) {
              auto pair = nb::cast<std::pair<nb::bytes, nb::bytes>>(p);
              specs.push_back(PeerSpec{ToBytes(pair.first), ToBytes(pair.second)});
            }
            MemoryRegionId id = RegionOf(self, region);
            std::shared_ptr<TransferEngine> e = EngineOf(self).shared();
            nb::gil_scoped_release release;
            return e->AddPeerGroup(id, specs).value;
          },
          nb::arg("region"), nb::arg("peers"),
          "Writes from `region` to peers [(address, descriptor), ...]; returns the group id.")
      .def(
          "scatter",
          [](PyEngine& e, uint32_t group, nb::handle writes, uint32_t imm) {
            std::vector<WriteSpec> specs = ToWrites(writes);
            std::shared_ptr<TransferEngine> te = e.shared();
            nb::gil_scoped_release release;
            return te->Scatter(PeerGroupId{group}, specs.data(), specs.size(), imm);
          },
          nb::arg("group"), nb::arg("writes"), nb::arg("imm"),
          "Posts writes (peer, src_offset, dst_offset, length), each carrying `imm`; returns a "
          "ticket for wait_sent.")
      .def(
          "barrier",
          [](PyEngine& e, uint32_t group, uint32_t imm) {
            std::shared_ptr<TransferEngine> te = e.shared();
            nb::gil_scoped_release release;
            return te->Barrier(PeerGroupId{group}, imm);
          },
          nb::arg("group"), nb::arg("imm"))
      .def(
          "wait_sent",
          [](PyEngine& e, uint64_t ticket, double timeout_s) {
            std::shared_ptr<TransferEngine> te = e.shared();
            nb::gil_scoped_release release;
            te->WaitSent(ticket, timeout_s);
          },
          nb::arg("ticket"), nb::arg("timeout_s") = 60.0)
      .def(
          "wait_imm",
          [](PyEngine& e, uint32_t imm, uint32_t count, double timeout_s) {
            std::shared_ptr<TransferEngine> te = e.shared();
            nb::gil_scoped_release release;
            te->WaitImm(imm, count, timeout_s);
          },
          nb::arg("imm"), nb::arg("count"), nb::arg("timeout_s") = 60.0,
          "Waits for `count` arrivals of `imm` and consumes them.")
      .def(
          "try_consume_imm",
          [](PyEngine& e, uint32_t imm, uint32_t count) {
            return e.engine().TryConsumeImm(imm, count);
          },
          nb::arg("imm"), nb::arg("count"),
          "Consumes `count` arrivals of `imm` if they are there; never waits.")
      .def("failure_message", [](PyEngine& e) { return e.engine().FailureMessage(); })
      .def("close", &PyEngine::Close, "Stops the proxy and releases every registration.")
      .def("__enter__", [](nb::handle self) { return nb::borrow(self); })
      .def("__exit__", [](PyEngine& e, nb::args) { e.Close(); });
}

}  // namespace jem
