#include "cc/a2a/nvlink_registry.h"

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

namespace jem {
namespace {

struct Registry {
  std::mutex mutex;
  int64_t next_id = 1;
  std::map<int64_t, std::vector<std::shared_ptr<NvlinkContext>>> contexts;
};

Registry& TheRegistry() {
  static Registry* registry = new Registry;  // never destroyed: handlers may run at exit
  return *registry;
}

}  // namespace

int64_t RegisterNvlinkContexts(std::vector<std::unique_ptr<NvlinkContext>> contexts) {
  std::vector<std::shared_ptr<NvlinkContext>> shared;
  for (auto& c : contexts) shared.push_back(std::move(c));
  std::sort(shared.begin(), shared.end(),
            [](const auto& a, const auto& b) { return a->rank() < b->rank(); });
  Registry& r = TheRegistry();
  std::lock_guard<std::mutex> lock(r.mutex);
  const int64_t id = r.next_id++;
  r.contexts.emplace(id, std::move(shared));
  return id;
}

std::vector<std::shared_ptr<NvlinkContext>> FindNvlinkContexts(int64_t id) {
  Registry& r = TheRegistry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto it = r.contexts.find(id);
  return it == r.contexts.end() ? std::vector<std::shared_ptr<NvlinkContext>>{} : it->second;
}

std::shared_ptr<NvlinkContext> FindNvlinkContext(int64_t id, int device) {
  Registry& r = TheRegistry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto it = r.contexts.find(id);
  if (it == r.contexts.end()) return nullptr;
  for (const auto& c : it->second) {
    if (c->device() == device) return c;
  }
  return nullptr;
}

bool RemoveNvlinkContexts(int64_t id) {
  std::vector<std::shared_ptr<NvlinkContext>> gone;
  {
    Registry& r = TheRegistry();
    std::lock_guard<std::mutex> lock(r.mutex);
    auto it = r.contexts.find(id);
    if (it == r.contexts.end()) return false;
    gone = std::move(it->second);
    r.contexts.erase(it);
  }
  // Every GPU of the group finishes first: a rank's kernels write into its peers' arenas.
  for (const auto& c : gone) c->Synchronize();
  return true;  // `gone` releases the contexts outside the lock
}

}  // namespace jem
