// Contexts by int64 id, for both platforms: Python creates them and passes the id to every
// custom call as the attribute `context`; the FFI handlers look them up from any thread.
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <utility>

namespace jem {

template <typename Entry>
class IdRegistry {
 public:
  // The process's registry of this entry type; never destroyed, since handlers may run at exit.
  static IdRegistry& Get() {
    static IdRegistry* registry = new IdRegistry;
    return *registry;
  }

  // Returns the new id: never 0, never reused within a process.
  int64_t Add(Entry entry) {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t id = next_id_++;
    entries_.emplace(id, std::move(entry));
    return id;
  }

  // pick(entry) under the lock, so that a handler copies out only what it needs; a
  // default-constructed result if the id is unknown.
  template <typename Pick>
  auto Find(int64_t id, Pick&& pick) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = entries_.find(id);
    return it == entries_.end() ? decltype(pick(it->second)){} : pick(it->second);
  }

  // The entry, for the caller to release outside the lock; nullopt if the id is unknown.
  std::optional<Entry> Remove(int64_t id) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = entries_.find(id);
    if (it == entries_.end()) return std::nullopt;
    std::optional<Entry> removed(std::move(it->second));
    entries_.erase(it);
    return removed;
  }

 private:
  IdRegistry() = default;

  std::mutex mutex_;
  int64_t next_id_ = 1;
  std::unordered_map<int64_t, Entry> entries_;
};

}  // namespace jem
