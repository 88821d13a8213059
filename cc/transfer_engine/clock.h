// The clock of every deadline, delay and timing of the engine and the proxies: their parts pass
// time points to each other (the proxy to its backoff and reorder buffer, a waiter to the
// immediate counter), so there is one.
#pragma once

#include <chrono>

namespace jem {

using Clock = std::chrono::steady_clock;

}  // namespace jem
