#include "cc/a2a/nvlink_registry.h"

#include <algorithm>
#include <utility>

#include "cc/a2a/id_registry.h"

namespace jem {
namespace {

using Contexts = std::vector<std::shared_ptr<NvlinkContext>>;
using Registry = IdRegistry<Contexts>;

}  // namespace

int64_t RegisterNvlinkContexts(std::vector<std::unique_ptr<NvlinkContext>> contexts) {
  Contexts shared;
  for (auto& c : contexts) shared.push_back(std::move(c));
  std::sort(shared.begin(), shared.end(),
            [](const auto& a, const auto& b) { return a->rank() < b->rank(); });
  return Registry::Get().Add(std::move(shared));
}

Contexts FindNvlinkContexts(int64_t id) {
  return Registry::Get().Find(id, [](const Contexts& contexts) { return contexts; });
}

std::shared_ptr<NvlinkContext> FindNvlinkContext(int64_t id, int device) {
  return Registry::Get().Find(id, [device](const Contexts& contexts) {
    for (const auto& c : contexts) {
      if (c->device() == device) return c;
    }
    return std::shared_ptr<NvlinkContext>();
  });
}

bool RemoveNvlinkContexts(int64_t id) {
  const std::optional<Contexts> gone = Registry::Get().Remove(id);
  if (!gone) return false;
  // Every GPU of the group finishes first: a rank's kernels write into its peers' arenas.
  for (const auto& c : *gone) c->Synchronize();
  return true;  // `gone` releases the contexts outside the lock
}

}  // namespace jem
