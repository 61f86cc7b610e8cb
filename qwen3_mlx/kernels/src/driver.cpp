#include "driver.h"

#include <algorithm>
#include <cstdlib>
#include <new>

#include "pool.h"

namespace q3k {
namespace {

struct Task {
  int mat, n0, n1;
  bool gemm;
};

struct Job {
  const Kernels* k;
  const std::vector<MatArgs>* mats;
  const std::vector<Task>* tasks;
};

int env_int(const char* name, int fallback) {
  if (const char* v = std::getenv(name)) {
    char* end = nullptr;
    long x = std::strtol(v, &end, 10);
    if (end != v && x >= 0) return static_cast<int>(x);
  }
  return fallback;
}

void run_task(void* ctx, int t, int /*thread*/) {
  thread_local Scratch tile;
  const Job& job = *static_cast<Job*>(ctx);
  const Task& task = (*job.tasks)[t];
  const MatArgs& a = (*job.mats)[task.mat];
  if (task.gemm) {
    float* buf = a.wt == WType::F32 ? nullptr : tile.get(static_cast<size_t>(task.n1 - task.n0) * a.K);
    job.k->gemm(a, task.n0, task.n1, buf);
  } else {
    job.k->gemv(a, task.n0, task.n1);
  }
}

}  // namespace

int gemv_max_rows() {
  static const int rows = env_int("QWEN3_MLX_GEMV_MAX_ROWS", 8);
  return rows;
}

Scratch::~Scratch() { std::free(p_); }

float* Scratch::get(size_t n) {
  if (n > cap_) {
    std::free(p_);
    const size_t bytes = ((std::max<size_t>(n, 16) * sizeof(float)) + 63) & ~size_t(63);
    p_ = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (!p_) throw std::bad_alloc();
    cap_ = bytes / sizeof(float);
  }
  return p_;
}

void run_products(const Kernels& k, const std::vector<MatArgs>& mats) {
  thread_local std::vector<Task> tasks;
  tasks.clear();
  const int threads = num_threads();
  int64_t total_rows = 0;
  for (const auto& a : mats) total_rows += a.N;
  for (int i = 0; i < static_cast<int>(mats.size()); ++i) {
    const MatArgs& a = mats[i];
    if (a.M <= 0 || a.N <= 0) continue;
    const bool gemm = a.M > gemv_max_rows();
    int rows;
    if (gemm) {
      // A block of expanded weight rows of at most ~256 KB (it stays in L2 while every activation
      // row passes over it), a multiple of 4 rows, and enough blocks to keep every thread busy.
      rows = std::clamp(65536 / std::max(a.K, 1), 4, 64) & ~3;
      const int64_t per_thread = (a.N + threads - 1) / threads;
      rows = static_cast<int>(std::max<int64_t>(4, std::min<int64_t>(rows, per_thread)));
    } else {
      // About eight tasks per thread over all the products (a task claim costs ~100 ns), at least 16
      // rows so the hardware prefetcher sees long runs.
      const int64_t target = std::max<int64_t>(16, total_rows / (8 * threads));
      rows = static_cast<int>(std::min<int64_t>(target, 512));
    }
    for (int n0 = 0; n0 < a.N; n0 += rows) tasks.push_back({i, n0, std::min(a.N, n0 + rows), gemm});
  }
  Job job{&k, &mats, &tasks};
  Pool::get().run(static_cast<int>(tasks.size()), &run_task, &job);
}

}  // namespace q3k
