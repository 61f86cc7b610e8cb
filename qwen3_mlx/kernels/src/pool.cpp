#include "pool.h"

#include <cstdlib>
#include <string>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define Q3K_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define Q3K_PAUSE() asm volatile("yield")
#else
#define Q3K_PAUSE() std::this_thread::yield()
#endif

namespace q3k {
namespace {

constexpr uint64_t kIdxBits = 20, kCountBits = 20;
constexpr uint64_t kIdxMask = (1ull << kIdxBits) - 1, kCountMask = (1ull << kCountBits) - 1;
constexpr int kMaxTasks = static_cast<int>(kIdxMask);
// After a region a worker first spins (a few microseconds: the next matmul of a decode step is often
// that close), then yields its core for a while (another runnable thread, such as MLX's own stream
// and Python threads on a 2-core machine, gets it; an idle core comes straight back), then sleeps.
// Spinning alone for ~1 ms took a core from MLX's threads: a 28-layer tiny model's decode step went 24 -> 21 ms
// with the yield phase (the 0.6B shape is unchanged within noise). QWEN3_MLX_SPIN / _YIELD override, for tuning.
int env_or(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}
const int kSpinIters = env_or("QWEN3_MLX_SPIN", 256);
const int kYieldIters = env_or("QWEN3_MLX_YIELD", 2000);

uint64_t pack(uint64_t gen, uint64_t count, uint64_t idx) {
  return (gen << (kIdxBits + kCountBits)) | (count << kIdxBits) | idx;
}
uint32_t gen_of(uint64_t s) { return static_cast<uint32_t>(s >> (kIdxBits + kCountBits)); }
int count_of(uint64_t s) { return static_cast<int>((s >> kIdxBits) & kCountMask); }
int idx_of(uint64_t s) { return static_cast<int>(s & kIdxMask); }

int usable_cores() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? static_cast<int>(n) : 1;
}

int configured_threads() {
  if (const char* env = std::getenv("QWEN3_MLX_THREADS")) {
    char* end = nullptr;
    long v = std::strtol(env, &end, 10);
    if (end != env && v >= 1) return static_cast<int>(v > 256 ? 256 : v);
  }
  return usable_cores();
}

}  // namespace

Pool& Pool::get() {
  // Leaked on purpose: joining threads from a static destructor at interpreter exit can deadlock.
  static Pool* pool = new Pool(configured_threads());
  return *pool;
}

int num_threads() { return Pool::get().size(); }

Pool::Pool(int threads) {
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { worker(i); });
}

Pool::~Pool() {
  stop_.store(true);
  {
    std::lock_guard<std::mutex> lock(sleep_mu_);
    state_.fetch_add(pack(1, 0, 0));
  }
  sleep_cv_.notify_all();
  for (auto& t : workers_) t.join();
}

bool Pool::claim(uint32_t gen, int* task) {
  uint64_t s = state_.load(std::memory_order_acquire);
  while (true) {
    if (gen_of(s) != gen || idx_of(s) >= count_of(s)) return false;
    if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
      *task = idx_of(s);
      return true;
    }
  }
}

void Pool::drain(uint32_t gen, int thread) {
  int task;
  while (claim(gen, &task)) {
    // fn_/ctx_ are stable here: the region cannot end while a task of it is unfinished.
    try {
      fn_(ctx_, task, thread);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mu_);
      if (!error_) error_ = std::current_exception();
    }
    done_.fetch_add(1, std::memory_order_acq_rel);
  }
}

void Pool::worker(int index) {
  uint32_t seen = gen_of(state_.load(std::memory_order_acquire));
  while (!stop_.load(std::memory_order_relaxed)) {
    uint32_t gen = seen;
    for (int i = 0; i < kSpinIters + kYieldIters; ++i) {
      gen = gen_of(state_.load(std::memory_order_acquire));
      if (gen != seen) break;
      if (i < kSpinIters) {
        Q3K_PAUSE();
      } else {
        std::this_thread::yield();
      }
    }
    if (gen == seen) {
      std::unique_lock<std::mutex> lock(sleep_mu_);
      sleepers_.fetch_add(1);
      sleep_cv_.wait(lock, [&] { return gen_of(state_.load()) != seen || stop_.load(); });
      sleepers_.fetch_sub(1);
      gen = gen_of(state_.load());
    }
    if (stop_.load()) return;
    seen = gen;
    drain(gen, index);
  }
}

void Pool::run(int ntasks, TaskFn fn, void* ctx) {
  if (ntasks <= 0) return;
  std::unique_lock<std::mutex> region(run_mu_, std::try_to_lock);
  if (workers_.empty() || ntasks == 1 || !region.owns_lock()) {
    for (int t = 0; t < ntasks; ++t) fn(ctx, t, 0);
    return;
  }
  // Regions larger than the task field are run as several regions.
  for (int base = 0; base < ntasks; base += kMaxTasks) {
    int n = std::min(kMaxTasks, ntasks - base);
    struct Offset {
      TaskFn fn;
      void* ctx;
      int base;
    } off{fn, ctx, base};
    if (base == 0) {
      fn_ = fn;
      ctx_ = ctx;
    } else {
      fn_ = [](void* c, int t, int th) {
        auto* o = static_cast<Offset*>(c);
        o->fn(o->ctx, t + o->base, th);
      };
      ctx_ = &off;
    }
    done_.store(0, std::memory_order_relaxed);
    uint64_t s = state_.load();
    uint32_t gen = (gen_of(s) + 1) & 0xFFFFFF;
    state_.store(pack(gen, static_cast<uint64_t>(n), 0));  // seq_cst: pairs with the sleepers' check
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_mu_);
      sleep_cv_.notify_all();
    }
    drain(gen, 0);
    while (done_.load(std::memory_order_acquire) < n) Q3K_PAUSE();
    if (error_) {
      std::exception_ptr e;
      std::swap(e, error_);  // every task of the region is done: no worker touches error_ now
      std::rethrow_exception(e);
    }
  }
}

}  // namespace q3k
