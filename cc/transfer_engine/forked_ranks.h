// Test support: ranks as forked processes that exchange addresses through their parent, so
// that C++ tests of the engine and of the layers above need no launcher. Fork before any
// libfabric call: a child must not inherit fabric state.
#pragma once

#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <vector>

#include "cc/transfer_engine/api.h"

namespace jem {

inline void SendBytes(int fd, const Bytes& b) {
  const uint32_t n = static_cast<uint32_t>(b.size());
  if (write(fd, &n, sizeof n) != sizeof n ||
      write(fd, b.data(), n) != static_cast<ssize_t>(n)) {
    throw Error("socketpair write failed");
  }
}

// False at a clean end of stream (the other side exited).
inline bool RecvBytes(int fd, Bytes& b) {
  uint32_t n = 0;
  const ssize_t got_n = read(fd, &n, sizeof n);
  if (got_n == 0) return false;
  if (got_n != sizeof n) throw Error("socketpair read failed");
  b.resize(n);
  size_t got = 0;
  while (got < n) {
    const ssize_t r = read(fd, b.data() + got, n - got);
    if (r <= 0) throw Error("socketpair read failed");
    got += r;
  }
  return true;
}

// Every rank's bytes, in rank order; each rank calls it the same number of times.
using AllGather = std::function<std::vector<Bytes>(const Bytes&)>;

// Runs body(rank, all_gather) in `ranks` forked children and relays their all-gathers.
// Returns 0 when every child exited with 0; a child that throws prints why and fails.
inline int RunForkedRanks(int ranks, const std::function<int(int, const AllGather&)>& body) {
  std::vector<int> fds(ranks);
  std::vector<pid_t> children(ranks);
  for (int r = 0; r < ranks; ++r) {
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, pair) != 0) return 2;
    children[r] = fork();
    if (children[r] < 0) return 2;
    if (children[r] == 0) {
      close(pair[0]);
      const AllGather all_gather = [fd = pair[1], ranks](const Bytes& mine) {
        SendBytes(fd, mine);
        std::vector<Bytes> all(ranks);
        for (Bytes& b : all) {
          if (!RecvBytes(fd, b)) throw Error("the parent went away during an all-gather");
        }
        return all;
      };
      int code = 1;
      try {
        code = body(r, all_gather);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "rank %d: %s\n", r, e.what());
      }
      std::fflush(nullptr);
      _exit(code);
    }
    close(pair[1]);
    fds[r] = pair[0];
  }
  // Relay rounds until a child leaves (all of them do, after their last all-gather).
  try {
    for (std::vector<Bytes> round(ranks);;) {
      bool open = true;
      for (int r = 0; r < ranks && open; ++r) open = RecvBytes(fds[r], round[r]);
      if (!open) break;
      for (int r = 0; r < ranks; ++r) {
        for (const Bytes& b : round) SendBytes(fds[r], b);
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "relay: %s\n", e.what());
  }
  for (int fd : fds) close(fd);
  int failed = 0;
  for (pid_t child : children) {
    int status = 0;
    waitpid(child, &status, 0);
    failed += !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
  return failed == 0 ? 0 : 1;
}

}  // namespace jem
