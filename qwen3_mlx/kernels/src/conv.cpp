// CausalConv: the Gated DeltaNet layers' short causal depthwise convolution and its SiLU, with the conv state
// (the last K - 1 inputs) carried from call to call. MLX composes it from a concatenate, K slices, K products,
// K sums and the SiLU's ops: ~4K + 4 graph nodes a layer and a call, each a pass over [L, C] (issue 15's
// profile: 16.8 of 39.6 ms of a DeltaNet layer's 128-token chunk were such elementwise ops).
//
// The sum is taken as the Python composition takes it: each tap's product rounded, added oldest first.
#include <algorithm>
#include <cstring>

#include "common.h"
#include "driver.h"
#include "pool.h"
#include "scalars.h"

namespace q3k {
namespace {

struct Job {
  const float* x;      // [B, L, C] contiguous
  const float* state;  // [B, K - 1, C] contiguous, or null (zeros)
  const void* w;       // [C, K]
  bool w_bf16;
  float* y;            // [B, L, C]
  const float* ones;   // [chunk]: the SiLU is our vectorized silu(g) * 1
  int B, L, C, K;
  int rows_per_task;
};

// Input row t of batch b of the concatenation [state; x] (t in [0, K - 1 + L)).
inline const float* input_row(const Job& j, int b, int t) {
  if (t >= j.K - 1) return j.x + (static_cast<int64_t>(b) * j.L + t - (j.K - 1)) * j.C;
  return j.state ? j.state + (static_cast<int64_t>(b) * (j.K - 1) + t) * j.C : nullptr;
}

Q3K_NO_CONTRACT void conv_row(const Job& j, int b, int l, float* out) {
  const int C = j.C, K = j.K;
  for (int c = 0; c < C; ++c) out[c] = 0.f;
  for (int i = 0; i < K; ++i) {
    const float* in = input_row(j, b, l + i);
    // The product and the sum as two statements: clang contracts a * b + c within one expression (arm64).
    if (j.w_bf16) {
      for (int c = 0; c < C; ++c) {
        const float p = (in ? in[c] : 0.f) * BF16S::get(j.w, static_cast<int64_t>(c) * K + i);
        out[c] = out[c] + p;
      }
    } else {
      const float* w = static_cast<const float*>(j.w);
      for (int c = 0; c < C; ++c) {
        const float p = (in ? in[c] : 0.f) * w[static_cast<int64_t>(c) * K + i];
        out[c] = out[c] + p;
      }
    }
  }
}

void run_rows(void* ctx, int t, int) {
  const Job& j = *static_cast<Job*>(ctx);
  const int64_t total = static_cast<int64_t>(j.B) * j.L;
  const int64_t r0 = static_cast<int64_t>(t) * j.rows_per_task, r1 = std::min(total, r0 + j.rows_per_task);
  for (int64_t r = r0; r < r1; ++r) {
    float* out = j.y + r * j.C;
    conv_row(j, static_cast<int>(r / j.L), static_cast<int>(r % j.L), out);
    kernels().swiglu(out, j.ones, out, j.C);
  }
}

class CausalConv : public CpuPrimitive {
 public:
  CausalConv(mx::Stream s, bool has_state) : CpuPrimitive(s), has_state_(has_state) {}

  // in: x [B, L, C], w [C, K(, 1)], [state [B, K - 1, C]]; out: y [B, L, C], new state [B, K - 1, C].
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    for (auto& o : out) o.set_data(mx::allocator::malloc(o.nbytes()));
    auto& enc = encoder(stream(), in, out);
    const auto& x = in[0];
    const int B = x.shape(0), L = x.shape(1), C = x.shape(2), K = in[1].shape(1);
    enc.dispatch([xp = x.data<float>(), xl = Layout(x), w = in[1].data<void>(), w_bf16 = in[1].dtype() == mx::bfloat16,
                  sp = has_state_ ? in[2].data<float>() : nullptr, sl = has_state_ ? Layout(in[2]) : Layout(x),
                  y = out[0].data<float>(), ns = out[1].data<float>(), B, L, C, K]() {
      thread_local Scratch xbuf, sbuf, ones;
      const float* xs = xp;
      if (!xl.contiguous) {
        float* c = xbuf.get(static_cast<size_t>(B) * L * C);
        copy_rows(xp, xl, c);
        xs = c;
      }
      const float* st = sp;
      if (sp && !sl.contiguous) {
        float* c = sbuf.get(static_cast<size_t>(B) * (K - 1) * C);
        copy_rows(sp, sl, c);
        st = c;
      }
      float* one = ones.get(static_cast<size_t>(C));
      std::fill(one, one + C, 1.f);
      Job job{xs, st, w, w_bf16, y, one, B, L, C, K, std::max(1, (1 << 14) / std::max(C, 1))};
      // The new state: the last K - 1 rows of [state; x] (copied before anything else reads them).
      for (int b = 0; b < B; ++b)
        for (int t = 0; t < K - 1; ++t) {
          const float* src = input_row(job, b, L + t);
          float* dst = ns + (static_cast<int64_t>(b) * (K - 1) + t) * C;
          if (src) {
            std::memcpy(dst, src, sizeof(float) * C);
          } else {
            std::fill(dst, dst + C, 0.f);
          }
        }
      const int64_t rows = static_cast<int64_t>(B) * L;
      Pool::get().run(static_cast<int>((rows + job.rows_per_task - 1) / job.rows_per_task), &run_rows, &job);
    });
  }

  const char* name() const override { return "Qwen3CausalConv"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return has_state_ == static_cast<const CausalConv&>(other).has_state_;
  }

 private:
  bool has_state_;
};

}  // namespace

std::vector<mx::array> causal_conv(const mx::array& x, const mx::array& w, const std::optional<mx::array>& state,
                                   mx::StreamOrDevice s) {
  Q3K_REQUIRE(x.ndim() == 3 && x.dtype() == mx::float32, "x must be float32 [B, L, channels], got " + shape_str(x));
  const int B = x.shape(0), C = x.shape(2);
  Q3K_REQUIRE((w.ndim() == 2 || (w.ndim() == 3 && w.shape(2) == 1)) && w.shape(0) == C && w.shape(1) >= 1 &&
                  (w.dtype() == mx::float32 || w.dtype() == mx::bfloat16),
              "conv weight must be float32 or bfloat16 [channels, kernel(, 1)] for " + std::to_string(C) +
                  " channels, got " + shape_str(w));
  const int K = w.shape(1);
  auto stream = mx::to_stream(s);
  std::vector<mx::array> inputs = {x, as_input(w, stream)};
  if (state) {
    Q3K_REQUIRE(state->ndim() == 3 && state->shape(0) == B && state->shape(1) == K - 1 && state->shape(2) == C &&
                    state->dtype() == mx::float32,
                "conv state must be float32 [" + std::to_string(B) + ", " + std::to_string(K - 1) + ", " +
                    std::to_string(C) + "], got " + shape_str(*state));
    inputs.push_back(*state);
  }
  return mx::array::make_arrays({x.shape(), {B, K - 1, C}}, {mx::float32, mx::float32},
                                std::make_shared<CausalConv>(stream, state.has_value()), inputs);
}

}  // namespace q3k
