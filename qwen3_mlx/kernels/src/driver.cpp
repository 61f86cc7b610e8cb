#include "driver.h"

#include <algorithm>
#include <cstdlib>
#include <new>

#include "int8.h"
#include "pool.h"

#if Q3K_HAVE_BLAS
#include <cblas.h>
#endif

namespace q3k {
namespace {

enum class Path { Gemv, Gemm, Blas, Int8Gemv, Int8Gemm };

struct Task {
  int mat, n0, n1;
  Path path;
};

struct Job {
  const Kernels* k;
  const std::vector<MatArgs>* mats;
  const std::vector<Task>* tasks;
};

constexpr int kBlasMinRows = 64;
// Weight bytes of a decode region below which it runs on the calling thread (~1.5 us of reads here, about
// what waking and joining another thread costs).
constexpr int64_t kSerialBytes = 32 << 10;

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
  switch (task.path) {
    case Path::Int8Gemv:  // x8 was prepared for the detected table
      return int8_detected()->gemv(a, task.n0, task.n1);
    case Path::Int8Gemm:
      return int8_detected()->gemm(a, task.n0, task.n1);
    case Path::Gemv:
      return job.k->gemv(a, task.n0, task.n1);
    case Path::Gemm: {
      float* buf = a.wt == WType::F32 ? nullptr : tile.get(static_cast<size_t>(task.n1 - task.n0) * a.K);
      return job.k->gemm(a, task.n0, task.n1, buf);
    }
    case Path::Blas: {
#if Q3K_HAVE_BLAS
      // Float32 weight rows read in place.
      const int nt = task.n1 - task.n0;
      const float* w = reinterpret_cast<const float*>(static_cast<const char*>(a.w) + task.n0 * a.w_row_bytes);
      const int64_t ldw = nt == 1 ? a.K : a.w_row_bytes / 4;  // a lone row's stride can be anything; BLAS wants >= K
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, a.M, nt, a.K, 1.f, a.x, static_cast<int>(a.ldx), w,
                        static_cast<int>(ldw), 0.f, a.y + task.n0, static_cast<int>(a.ldy));
#endif
      return;
    }
  }
}

// OpenBLAS's own threads stay idle: our pool owns the cores and each task's GEMM runs on one thread,
// so the two never oversubscribe them.
bool blas_ready() {
#if Q3K_HAVE_BLAS
  static const bool ready = [] {
    if (env_int("QWEN3_MLX_BLAS", 1) == 0) return false;
    scipy_openblas_set_num_threads(1);
    return true;
  }();
  return ready;
#else
  return false;
#endif
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
    // Float32 weights from this many rows: OpenBLAS's GEMM beats our blocked kernel (1.3-1.9x at 128-512
    // rows, slower at 16). Quantized and bfloat16 weights stay on ours, which expands a block small enough
    // for L2: expanding a larger tile for BLAS measured 10-15% slower prefill. Scattered output rows (expert
    // gathers) stay on ours too.
    const int path_rows = a.path_rows > 0 ? a.path_rows : a.M;
    const bool blas = a.wt == WType::F32 && path_rows >= kBlasMinRows && a.yrows == nullptr && blas_ready();
    const bool gemm = path_rows > gemv_max_rows();
    int rows;
    if (a.x8.codes && gemm) {
      // The integer prefill repacks a block of up to ~128 KB of codes, a multiple of 32 rows.
      rows = std::max(32, (131072 / std::max(a.K, 1)) & ~31);
      const int64_t per_thread = ((a.N + threads - 1) / threads + 31) & ~int64_t(31);
      rows = static_cast<int>(std::max<int64_t>(32, std::min<int64_t>(rows, per_thread)));
    } else if (blas) {
      // Two tasks per thread (each GEMM packs the activations again), a multiple of 16 rows.
      const int64_t per_task = (a.N + 2 * threads - 1) / (2 * threads);
      rows = static_cast<int>(std::max<int64_t>(16, (per_task + 15) & ~int64_t(15)));
    } else if (gemm) {
      // A block of expanded weight rows of at most ~256 KB (it stays in L2 while every activation
      // row passes over it), a multiple of 4 rows, and enough blocks to keep every thread busy.
      rows = std::clamp(65536 / std::max(a.K, 1), 4, 64) & ~3;
      const int64_t per_thread = (a.N + threads - 1) / threads;
      rows = static_cast<int>(std::max<int64_t>(4, std::min<int64_t>(rows, per_thread)));
    } else {
      // About eight tasks per thread over all the products (a task claim costs ~100 ns), at least 16
      // rows so the hardware prefetcher sees long runs.
      const int64_t target = std::max<int64_t>(16, total_rows / (8 * threads));
      rows = static_cast<int>(std::min<int64_t>(target, a.x8.codes ? 128 : 512));
    }
    const Path path = a.x8.codes ? (gemm ? Path::Int8Gemm : Path::Int8Gemv)
                                 : blas ? Path::Blas : (gemm ? Path::Gemm : Path::Gemv);
    for (int n0 = 0; n0 < a.N; n0 += rows) tasks.push_back({i, n0, std::min(a.N, n0 + rows), path});
  }
  Job job{&k, &mats, &tasks};
  // Products this small (a decode step of a tiny model: 64-wide layers) take less time than handing tasks to
  // another thread and waiting for it: they run on the caller, in the same tasks (so the same results).
  int64_t bytes = 0;
  for (const auto& a : mats) bytes += a.M <= gemv_max_rows() ? static_cast<int64_t>(a.N) * a.w_row_bytes : kSerialBytes;
  if (bytes < kSerialBytes) {
    for (int t = 0; t < static_cast<int>(tasks.size()); ++t) run_task(&job, t, 0);
    return;
  }
  Pool::get().run(static_cast<int>(tasks.size()), &run_task, &job);
}

}  // namespace q3k
