// Splits one or more matrix products over the thread pool (used by every primitive's eval_cpu).
#pragma once

#include <cstddef>
#include <vector>

#include "kernels.h"

namespace q3k {

// Up to this many activation rows a matrix runs the decode kernel (weights decoded in registers);
// above it, the blocked kernel that expands a block of weight rows to floats and reuses it.
int gemv_max_rows();

// Runs every product in `mats` (independent outputs) on the pool and returns when all are done.
void run_products(const Kernels& k, const std::vector<MatArgs>& mats);

// Scratch owned by one thread, grown on demand and never shrunk (no allocation per call once a
// shape has been seen). 64-byte aligned: a vector load that splits a cache line costs two, which
// halved the multi-row decode speed.
class Scratch {
 public:
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch();
  float* get(size_t n);

 private:
  float* p_ = nullptr;
  size_t cap_ = 0;
};

}  // namespace q3k
