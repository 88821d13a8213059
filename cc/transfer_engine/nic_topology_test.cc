// NIC order by PCI distance, on made-up sysfs paths: a GPU and NICs under two PCIe switches
// of one root complex, one on another root complex, and one whose path is unknown.
#include <cstdio>
#include <string>
#include <vector>

#include "cc/transfer_engine/nic_topology.h"

namespace {

int failures = 0;

void Expect(const std::vector<size_t>& got, const std::vector<size_t>& want, const char* what) {
  if (got == want) return;
  ++failures;
  std::fprintf(stderr, "%s: got", what);
  for (size_t i : got) std::fprintf(stderr, " %zu", i);
  std::fprintf(stderr, ", want");
  for (size_t i : want) std::fprintf(stderr, " %zu", i);
  std::fprintf(stderr, "\n");
}

}  // namespace

int main() {
  const std::string root0 = "/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0";
  const std::string switch_a = root0 + "/0000:02:00.0";
  const std::string switch_b = root0 + "/0000:02:08.0";
  const std::string gpu = switch_a + "/0000:03:00.0";
  const std::vector<std::string> nics = {
      "/sys/devices/pci0000:80/0000:80:01.0/0000:81:00.0",  // other root complex
      switch_b + "/0000:05:00.0",                           // same root, other switch
      "",                                                   // provider gave no PCI address
      switch_a + "/0000:04:00.0",                           // same switch as the GPU
      switch_b + "/0000:06:00.0",                           // ties with NIC 1
  };
  using jem::OrderByPciDistance;
  Expect(OrderByPciDistance(gpu, nics), {3, 1, 4, 0, 2}, "nearest first, ties in given order");
  // A GPU across the root complex from all but NIC 0.
  Expect(OrderByPciDistance("/sys/devices/pci0000:80/0000:80:02.0/0000:82:00.0", nics),
         {0, 1, 3, 4, 2}, "other root complex");
  // Component-wise, not character-wise: "0000:02:0" is a common character prefix of both
  // switches but no common component.
  Expect(OrderByPciDistance(switch_b + "/0000:07:00.0", {switch_a + "/x", switch_b + "/y"}),
         {1, 0}, "components, not characters");
  Expect(OrderByPciDistance(gpu, {}), {}, "no NICs");
  Expect(OrderByPciDistance(gpu, {"", ""}), {0, 1}, "no paths known: provider order");
  Expect(OrderByPciDistance(gpu + "/", {gpu}), {0}, "trailing slash");
  if (!jem::PciDevicePath("ffff:ff:ff.7").empty()) {
    ++failures;
    std::fprintf(stderr, "a PCI address that does not exist resolved\n");
  }
  std::printf("nic_topology_test: %d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
