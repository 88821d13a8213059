#include "cc/a2a/context_registry.h"

#include <mutex>
#include <unordered_map>

namespace jem {
namespace {

struct Registry {
  std::mutex mutex;
  int64_t next_id = 1;
  std::unordered_map<int64_t, std::shared_ptr<AllToAllContext>> contexts;
};

Registry& GetRegistry() {
  static Registry* registry = new Registry();  // never destroyed: handlers may run at exit
  return *registry;
}

}  // namespace

int64_t RegisterContext(std::unique_ptr<AllToAllContext> context) {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mutex);
  const int64_t id = r.next_id++;
  r.contexts.emplace(id, std::move(context));
  return id;
}

std::shared_ptr<AllToAllContext> FindContext(int64_t id) {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto it = r.contexts.find(id);
  return it == r.contexts.end() ? nullptr : it->second;
}

bool RemoveContext(int64_t id) {
  std::shared_ptr<AllToAllContext> removed;  // destroyed outside the lock
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto it = r.contexts.find(id);
  if (it == r.contexts.end()) return false;
  removed = std::move(it->second);
  r.contexts.erase(it);
  return true;
}

}  // namespace jem
