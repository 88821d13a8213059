// All-to-all contexts by int64 id: Python creates them and passes the id to every custom call
// as the attribute `context`; the FFI handlers look them up here, from any thread.
#pragma once

#include <cstdint>
#include <memory>

#include "cc/a2a/all_to_all_context.h"

namespace jem {

// Takes ownership; returns the new id (never 0, never reused within a process).
int64_t RegisterContext(std::unique_ptr<AllToAllContext> context);
// The context, or null if the id is unknown or was removed. A step in progress keeps its
// context alive until it returns, even if it is removed meanwhile.
std::shared_ptr<AllToAllContext> FindContext(int64_t id);
// Returns whether the id was known.
bool RemoveContext(int64_t id);

}  // namespace jem
