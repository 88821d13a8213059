// NVLink all-to-all contexts by int64 id. One id names one context per participating GPU of
// this process (one process may drive several GPUs: XLA then calls each handler from one
// thread per device, and the handler picks the context of the GPU XLA runs it on).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "cc/a2a/nvlink_context.h"

namespace jem {

// Takes ownership of the contexts (at most one per device); returns the new id (never 0,
// never reused within a process).
int64_t RegisterNvlinkContexts(std::vector<std::unique_ptr<NvlinkContext>> contexts);
// The contexts of an id, in rank order; empty if the id is unknown.
std::vector<std::shared_ptr<NvlinkContext>> FindNvlinkContexts(int64_t id);
// The context of an id on a device, or null. A step in progress keeps it alive.
std::shared_ptr<NvlinkContext> FindNvlinkContext(int64_t id, int device);
// Returns whether the id was known. The contexts go once no step holds them.
bool RemoveNvlinkContexts(int64_t id);

}  // namespace jem
