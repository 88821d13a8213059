// FastDiv against the hardware's division: divisors the layouts give (small, powers of two) and
// random ones up to 2^31 - 1, numerators at the edges of each quotient and drawn at random.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>

#include "cc/kernels/fast_div.h"

int main() {
  std::mt19937_64 rng(std::random_device{}());
  std::uniform_int_distribution<int32_t> any(0, INT32_MAX);
  int64_t failures = 0, checks = 0;
  auto check = [&](const jem::FastDiv& f, int32_t x) {
    ++checks;
    const bool round_up_ok =
        int64_t{x} + f.d - 1 > INT32_MAX || f.RoundUp(x) == (int64_t{x} + f.d - 1) / f.d * f.d;
    if (f.Div(x) == x / f.d && f.Mod(x) == x % f.d && round_up_ok) return;
    if (++failures <= 10) {
      std::fprintf(stderr, "%d / %d: got %d rem %d\n", x, f.d, f.Div(x), f.Mod(x));
    }
  };
  auto check_divisor = [&](int32_t d) {
    const jem::FastDiv f(d);
    for (int32_t x : {0, 1, d - 1, d, d + 1, INT32_MAX - 1, INT32_MAX}) {
      if (x >= 0) check(f, x);
    }
    for (int i = 0; i < 2000; ++i) check(f, any(rng));
    // Around a random multiple of d.
    for (int i = 0; i < 200; ++i) {
      const int64_t q = any(rng) / d, base = q * d;
      for (int64_t x = base - 1; x <= base + 1; ++x) {
        if (x >= 0 && x <= INT32_MAX) check(f, static_cast<int32_t>(x));
      }
    }
  };
  for (int32_t d = 1; d <= 5000; ++d) check_divisor(d);
  for (int s = 0; s < 31; ++s) {
    check_divisor(int32_t{1} << s);
    if (s > 1) check_divisor((int32_t{1} << s) - 1);
  }
  for (int i = 0; i < 2000; ++i) check_divisor(std::max<int32_t>(1, any(rng)));
  std::printf("%lld checks, %lld failures\n", static_cast<long long>(checks),
              static_cast<long long>(failures));
  return failures == 0 ? 0 : 1;
}
