#include "cc/a2a/context_registry.h"

#include "cc/a2a/id_registry.h"

namespace jem {
namespace {

using Registry = IdRegistry<std::shared_ptr<AllToAllContext>>;

}  // namespace

int64_t RegisterContext(std::unique_ptr<AllToAllContext> context) {
  return Registry::Get().Add(std::move(context));
}

std::shared_ptr<AllToAllContext> FindContext(int64_t id) {
  return Registry::Get().Find(id, [](const auto& context) { return context; });
}

bool RemoveContext(int64_t id) {
  return Registry::Get().Remove(id).has_value();  // the context goes outside the lock
}

}  // namespace jem
