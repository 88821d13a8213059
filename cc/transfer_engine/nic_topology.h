// Which NICs an engine opens when the provider offers several: those nearest the GPU it
// serves on the PCI tree, judged from sysfs device paths (a NIC under the same PCIe switch as
// the GPU shares a longer prefix of its path than one across the root complex).
#pragma once

#include <rdma/fabric.h>

#include <cstddef>
#include <string>
#include <vector>

namespace jem {

// Indices into `nic_paths`, nearest to `gpu_path` first: by the number of leading path
// components a NIC's path shares with the GPU's, longest first; ties keep their given order,
// and NICs whose path is unknown ("") come last. Pure: no file system access.
std::vector<size_t> OrderByPciDistance(const std::string& gpu_path,
                                       const std::vector<std::string>& nic_paths);

// The sysfs device path of a PCI function ("0000:1b:00.0" ->
// "/sys/devices/pci0000:00/.../0000:1b:00.0"), or "" when sysfs does not know it.
std::string PciDevicePath(const std::string& pci_address);

// A NIC's PCI address from fi_info's nic bus attributes, or "" when the provider gives none.
std::string NicPciAddress(const fi_info* info);

}  // namespace jem
