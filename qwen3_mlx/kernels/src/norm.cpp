// RMSNorm: x * rsqrt(mean(x^2) + eps) * weight over the last axis, one pass per row. On the CPU MLX has
// no kernel for mx.fast.rms_norm and builds it from seven elementwise and reduction ops; with ~4.5
// norms per decoder layer those nodes were a quarter of a decode step's graph.
#include <cmath>
#include <cstring>

#include "common.h"
#include "driver.h"
#include "pool.h"
#include "steps.h"

namespace q3k {
namespace {

struct Job {
  const float* x;
  const void* w;
  bool w_bf16;
  float* out;
  int64_t rows, rows_per_task;
  int D;
  float eps;
};

inline float bf16_bits(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

void run_rows(void* ctx, int t, int) {
  const Job& j = *static_cast<Job*>(ctx);
  const int64_t r0 = t * j.rows_per_task, r1 = std::min(j.rows, r0 + j.rows_per_task);
  const int D = j.D;
  const float inv_d = static_cast<float>(1.0 / D);  // MLX's mean: the sum times 1/D
  for (int64_t r = r0; r < r1; ++r) {
    const float* x = j.x + r * D;
    float* y = j.out + r * D;
    // 16 partial sums in a fixed order: vectorized without reassociating, deterministic per shape.
    float acc[16] = {};
    int k = 0;
    for (; k + 16 <= D; k += 16)
      for (int l = 0; l < 16; ++l) acc[l] += x[k + l] * x[k + l];
    float ss = 0.f;
    for (int l = 0; l < 16; ++l) ss += acc[l];
    for (; k < D; ++k) ss += x[k] * x[k];
    // The same roundings as MLX's composition: (x * r) rounded, then times the weight.
    const float rs = 1.f / std::sqrt(ss * inv_d + j.eps);
    if (j.w_bf16) {
      const auto* w = static_cast<const uint16_t*>(j.w);
      for (int i = 0; i < D; ++i) y[i] = (x[i] * rs) * bf16_bits(w[i]);
    } else {
      const auto* w = static_cast<const float*>(j.w);
      for (int i = 0; i < D; ++i) y[i] = (x[i] * rs) * w[i];
    }
  }
}

class RMSNorm : public CpuPrimitive {
 public:
  RMSNorm(mx::Stream s, float eps) : CpuPrimitive(s), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const auto& x = in[0];
    const auto& w = in[1];
    auto& y = out[0];
    // In place when nothing else holds x (each row is read whole before it is written).
    if (x.is_donatable() && x.flags().row_contiguous) {
      y.copy_shared_buffer(x);
    } else {
      alloc_output(y);
    }
    auto& enc = encoder(stream(), in, out);
    const int D = x.shape(-1);
    const int64_t rows = D > 0 ? static_cast<int64_t>(x.size()) / D : 0;
    Job job{x.data<float>(), w.data<void>(), w.dtype() == mx::bfloat16, y.data<float>(), rows,
            std::max<int64_t>(1, (int64_t(1) << 14) / std::max(D, 1)), D, eps_};
    enc.dispatch([job, xl = Layout(x)]() mutable {
      thread_local Scratch xbuf;
      if (!xl.contiguous) {
        float* c = xbuf.get(static_cast<size_t>(job.rows) * job.D);
        copy_rows(job.x, xl, c);
        job.x = c;
      }
      // Rows in tasks of ~16K values: a decode row stays on the stream thread.
      Pool::get().run(static_cast<int>((job.rows + job.rows_per_task - 1) / job.rows_per_task), &run_rows, &job);
    });
  }

  const char* name() const override { return "Qwen3RMSNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RMSNorm&>(other).eps_;
  }

 private:
  float eps_;
};

}  // namespace

void rms_norm_rows(const float* x, const void* w, bool w_bf16, float* y, int64_t rows, int D, float eps) {
  Job job{x, w, w_bf16, y, rows, std::max<int64_t>(rows, 1), D, eps};
  run_rows(&job, 0, 0);
}

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s) {
  Q3K_REQUIRE(x.ndim() >= 1 && x.shape(-1) >= 1, "rms_norm input must have a non-empty last axis, got " + shape_str(x));
  Q3K_REQUIRE(x.dtype() == mx::float32, "rms_norm input must be float32");
  Q3K_REQUIRE(weight.ndim() == 1 && weight.shape(0) == x.shape(-1),
          "rms_norm weight " + shape_str(weight) + " does not match input " + shape_str(x));
  Q3K_REQUIRE(weight.dtype() == mx::float32 || weight.dtype() == mx::bfloat16, "rms_norm weight must be float32 or bfloat16");
  auto stream = mx::to_stream(s);
  return mx::array(x.shape(), mx::float32, std::make_shared<RMSNorm>(stream, eps), {x, as_input(weight, stream)});
}

}  // namespace q3k
