// Two ranks (fork) over tcp;ofi_rxm: each scatters random slices of random bytes into the
// other's region with immediates, waits for the other's writes by counting immediates, and
// checks every byte against what the sender's seed says it wrote. Exit code 0 on success.
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "cc/transfer_engine/api.h"

namespace {

constexpr size_t kRegion = 1 << 20;  // first half: source bytes; second half: landing area
constexpr size_t kHalf = kRegion / 2;
constexpr int kWrites = 64;
constexpr uint32_t kImm = 0xC0FFEE;
constexpr uint32_t kBarrierImm = 7;
constexpr double kTimeoutS = 30.0;

void SendBytes(int fd, const jem::Bytes& b) {
  uint32_t n = static_cast<uint32_t>(b.size());
  if (write(fd, &n, sizeof n) != sizeof n ||
      write(fd, b.data(), n) != static_cast<ssize_t>(n)) {
    throw jem::Error("socketpair write failed");
  }
}

jem::Bytes RecvBytes(int fd) {
  uint32_t n = 0;
  if (read(fd, &n, sizeof n) != sizeof n) throw jem::Error("socketpair read failed");
  jem::Bytes b(n);
  size_t got = 0;
  while (got < n) {
    ssize_t r = read(fd, b.data() + got, n - got);
    if (r <= 0) throw jem::Error("socketpair read failed");
    got += r;
  }
  return b;
}

// Everything rank `rank` writes is derived from its seed, so the receiver can recompute it.
std::vector<uint8_t> SourceBytes(int rank) {
  std::mt19937_64 rng(1000 + rank);
  std::vector<uint8_t> bytes(kHalf);
  for (auto& b : bytes) b = static_cast<uint8_t>(rng());
  return bytes;
}

// Disjoint destination slots, random source offsets and lengths (some zero).
std::vector<jem::WriteSpec> Writes(int rank) {
  std::mt19937_64 rng(2000 + rank);
  const size_t slot = kHalf / kWrites;
  std::vector<jem::WriteSpec> writes;
  for (int i = 0; i < kWrites; ++i) {
    jem::WriteSpec w;
    w.length = rng() % (slot + 1);
    w.src_offset = rng() % (kHalf - w.length + 1);
    w.dst_offset = kHalf + i * slot;
    writes.push_back(w);
  }
  return writes;
}

int Run(int rank, int fd) {
  jem::EngineOptions options;
  options.provider = "tcp;ofi_rxm";
  auto engine = jem::TransferEngine::Create(options);
  std::vector<uint8_t> region(kRegion, 0);
  std::vector<uint8_t> source = SourceBytes(rank);
  std::memcpy(region.data(), source.data(), kHalf);
  jem::MemoryRegionId mr = engine->RegisterMemory(region.data(), region.size(),
                                                  jem::MemoryKind::kHost);
  SendBytes(fd, engine->Address());
  SendBytes(fd, engine->Descriptor(mr));
  jem::PeerSpec peer{RecvBytes(fd), RecvBytes(fd)};
  jem::PeerGroupId group = engine->AddPeerGroup(mr, {peer});

  std::vector<jem::WriteSpec> writes = Writes(rank);
  jem::SendTicket ticket = engine->Scatter(group, writes.data(), writes.size(), kImm);
  engine->WaitSent(ticket, kTimeoutS);
  engine->WaitImm(kImm, kWrites, kTimeoutS);

  const int other = 1 - rank;
  std::vector<uint8_t> theirs = SourceBytes(other);
  int bad = 0;
  for (const jem::WriteSpec& w : Writes(other)) {
    if (std::memcmp(region.data() + w.dst_offset, theirs.data() + w.src_offset, w.length) != 0) {
      ++bad;
    }
  }
  // Both ranks have checked before either closes its endpoint.
  engine->WaitSent(engine->Barrier(group, kBarrierImm), kTimeoutS);
  engine->WaitImm(kBarrierImm, 1, kTimeoutS);
  std::printf("rank %d: %d of %d writes wrong\n", rank, bad, kWrites);
  std::fflush(stdout);
  return bad == 0 ? 0 : 1;
}

int RunChecked(int rank, int fd) {
  try {
    return Run(rank, fd);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
    return 1;
  }
}

}  // namespace

int main() {
  setenv("FI_TCP_IFACE", "lo", 0);
  int fds[2];
  if (socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0) return 2;
  // Fork before any libfabric call: the child must not inherit fabric state.
  pid_t child = fork();
  if (child < 0) return 2;
  if (child == 0) _exit(RunChecked(1, fds[1]));
  int code = RunChecked(0, fds[0]);
  int status = 0;
  waitpid(child, &status, 0);
  bool child_ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
  return code == 0 && child_ok ? 0 : 1;
}
