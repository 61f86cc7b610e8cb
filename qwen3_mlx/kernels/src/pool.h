// A persistent thread pool for the kernels: created once, reused by every call.
//
// MLX runs a primitive's CPU work on its stream's single worker thread; that thread joins the pool's
// workers for the parallel part and waits for them. Workers spin briefly after a region (decode issues
// hundreds of small matmuls per token, and a sleeping thread takes tens of microseconds to wake), then
// sleep on a condition variable so an idle runtime costs no CPU.
#pragma once

#include <atomic>
#include <condition_variable>
#include <exception>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace q3k {

using TaskFn = void (*)(void* ctx, int task, int thread);

class Pool {
 public:
  // The process-wide pool; its size is fixed at first use (QWEN3_MLX_THREADS, else the usable cores).
  static Pool& get();

  // Threads that take part in a region, the caller included.
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs fn(ctx, t, thread) for t in [0, ntasks) and returns when all are done (`thread` is the
  // pool index of the thread running the task; scratch memory is thread_local, not indexed by it).
  // If another thread is already running a region, the tasks run on the caller alone. A task's
  // exception (out of memory for scratch) is rethrown here after the whole region has finished.
  void run(int ntasks, TaskFn fn, void* ctx);

  ~Pool();

 private:
  explicit Pool(int threads);
  void worker(int index);
  bool claim(uint32_t gen, int* task);
  void drain(uint32_t gen, int thread);

  std::vector<std::thread> workers_;
  std::mutex run_mu_;
  // state_ = generation (24 bits) | number of tasks (20 bits) | next task (20 bits): claiming a task
  // and checking that it belongs to the current region is one compare-and-swap.
  std::atomic<uint64_t> state_{0};
  std::atomic<int> done_{0};
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
  std::mutex sleep_mu_;
  std::condition_variable sleep_cv_;
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  // The first exception a task threw in the current region, rethrown by run() once every task is done.
  std::mutex error_mu_;
  std::exception_ptr error_;
};

// Threads the kernels use (the pool's size).
int num_threads();

}  // namespace q3k
