// SwiGLU: silu(gate) * up in one vectorized pass (MLX's compiled CPU kernel evaluates exp one element at
// a time: ~10% of a prefill).
#include <algorithm>

#include "common.h"
#include "driver.h"
#include "pool.h"

namespace q3k {
namespace {

struct Job {
  const float *g, *u;
  float* out;
  int64_t n, chunk;
};

void run_chunk(void* ctx, int t, int) {
  const Job& j = *static_cast<Job*>(ctx);
  const int64_t lo = t * j.chunk, hi = std::min(j.n, lo + j.chunk);
  kernels().swiglu(j.g + lo, j.u + lo, j.out + lo, hi - lo);
}

class SwiGLU : public CpuPrimitive {
 public:
  explicit SwiGLU(mx::Stream s) : CpuPrimitive(s) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    auto& y = out[0];
    // Write over gate's (or up's) buffer when nothing else holds it, as MLX's elementwise ops do: a
    // fresh output would keep three [tokens, hidden] arrays alive at the MLP's peak instead of two.
    if (in[0].is_donatable() && in[0].flags().row_contiguous) {
      y.copy_shared_buffer(in[0]);
    } else if (in[1].is_donatable() && in[1].flags().row_contiguous) {
      y.copy_shared_buffer(in[1]);
    } else {
      alloc_output(y);
    }
    auto& enc = encoder(stream(), in, out);
    enc.dispatch([g = in[0].data<float>(), gl = Layout(in[0]), u = in[1].data<float>(), ul = Layout(in[1]),
                  yp = y.data<float>(), n = static_cast<int64_t>(y.size())]() mutable {
      thread_local Scratch gbuf, ubuf;
      if (!gl.contiguous) {
        float* c = gbuf.get(n);
        copy_rows(g, gl, c);
        g = c;
      }
      if (!ul.contiguous) {
        float* c = ubuf.get(n);
        copy_rows(u, ul, c);
        u = c;
      }
      // Chunks of 16K values: small tensors (decode) stay on the stream thread.
      Job job{g, u, yp, n, int64_t(1) << 14};
      Pool::get().run(static_cast<int>((n + job.chunk - 1) / job.chunk), &run_chunk, &job);
    });
  }

  const char* name() const override { return "Qwen3SwiGLU"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

}  // namespace

mx::array swiglu(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s) {
  Q3K_REQUIRE(gate.shape() == up.shape(), "gate " + shape_str(gate) + " and up " + shape_str(up) + " differ");
  Q3K_REQUIRE(gate.dtype() == mx::float32 && up.dtype() == mx::float32, "gate and up must be float32");
  return mx::array(gate.shape(), mx::float32, std::make_shared<SwiGLU>(mx::to_stream(s)), {gate, up});
}

}  // namespace q3k
