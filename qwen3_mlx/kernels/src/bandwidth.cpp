// A memory read test on the kernels' own thread pool: the roofline the decode kernels are measured
// against (benchmarks/vs_llama_cpp.py). Not used by the model.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <new>

#include "ops.h"
#include "pool.h"

namespace q3k {

double read_bandwidth_gbs(int64_t nbytes, int repeats) {
  const int64_t n = std::max<int64_t>(nbytes / 8, 1 << 16) & ~int64_t(1023);
  auto* buf = static_cast<uint64_t*>(std::aligned_alloc(64, n * 8));
  if (!buf) throw std::bad_alloc();
  std::memset(buf, 1, n * 8);
  struct Ctx {
    const uint64_t* p;
    int64_t n, chunk;
    uint64_t sink[256];
  } ctx{buf, n, 1 << 16, {}};
  const int tasks = static_cast<int>((n + ctx.chunk - 1) / ctx.chunk);
  auto body = [](void* c, int t, int th) {
    auto* x = static_cast<Ctx*>(c);
    const int64_t lo = static_cast<int64_t>(t) * x->chunk, hi = std::min(x->n, lo + x->chunk);
    uint64_t a = 0, b = 0, d = 0, e = 0;  // four chains: the loop is bound by loads, not adds
    for (int64_t i = lo; i < hi; i += 4) a += x->p[i], b += x->p[i + 1], d += x->p[i + 2], e += x->p[i + 3];
    x->sink[th & 255] += a + b + d + e;
  };
  Pool::get().run(tasks, body, &ctx);  // warm-up: page faults, pool wake-up
  double best = 0;
  for (int r = 0; r < std::max(repeats, 1); ++r) {
    auto t0 = std::chrono::steady_clock::now();
    Pool::get().run(tasks, body, &ctx);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, n * 8 / s / 1e9);
  }
  std::free(buf);
  return best;
}

}  // namespace q3k
