#include "cc/transfer_engine/nic_topology.h"

#include <rdma/fi_domain.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>

namespace jem {
namespace {

std::vector<std::string> Components(const std::string& path) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (start <= path.size()) {
    size_t end = path.find('/', start);
    if (end == std::string::npos) end = path.size();
    if (end > start) parts.push_back(path.substr(start, end - start));
    start = end + 1;
  }
  return parts;
}

int CommonComponents(const std::vector<std::string>& a, const std::vector<std::string>& b) {
  size_t n = 0;
  while (n < a.size() && n < b.size() && a[n] == b[n]) ++n;
  return static_cast<int>(n);
}

}  // namespace

std::vector<size_t> OrderByPciDistance(const std::string& gpu_path,
                                       const std::vector<std::string>& nic_paths) {
  const std::vector<std::string> gpu = Components(gpu_path);
  std::vector<int> shared(nic_paths.size());
  for (size_t i = 0; i < nic_paths.size(); ++i) {
    shared[i] = nic_paths[i].empty() ? -1 : CommonComponents(gpu, Components(nic_paths[i]));
  }
  std::vector<size_t> order(nic_paths.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return shared[a] > shared[b]; });
  return order;
}

std::string PciDevicePath(const std::string& pci_address) {
  if (pci_address.empty()) return "";
  std::string link = "/sys/bus/pci/devices/" + pci_address;
  char resolved[PATH_MAX];
  return realpath(link.c_str(), resolved) ? std::string(resolved) : std::string();
}

std::string NicPciAddress(const fi_info* info) {
  if (!info->nic || !info->nic->bus_attr || info->nic->bus_attr->bus_type != FI_BUS_PCI) {
    return "";
  }
  const fi_pci_attr& pci = info->nic->bus_attr->attr.pci;
  char text[32];
  std::snprintf(text, sizeof text, "%04x:%02x:%02x.%x", pci.domain_id, pci.bus_id, pci.device_id,
                pci.function_id);
  return text;
}

}  // namespace jem
