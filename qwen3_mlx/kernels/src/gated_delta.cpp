// Gated delta rule (Gated DeltaNet's linear attention, Qwen3-Next / Qwen3.5): one task per (sequence, value
// head) on the pool, each running the recurrence token by token with its [Dk, Dv] state in cache. On a CPU
// this is compute-bound at full speed and exact to the step-by-step definition; the chunked form (small
// matmuls per chunk) pays on GPUs and stays MLX's path there.
#include <algorithm>
#include <cstring>

#include "common.h"
#include "driver.h"
#include "pool.h"

namespace q3k {
namespace {

struct Job {
  const float *q, *k, *v, *g, *beta, *s0;
  float *out, *s;
  int L, Dk, Dv;
};

void run_head(void* ctx, int t, int) {
  thread_local Scratch kv;
  const Job& j = *static_cast<Job*>(ctx);
  const int64_t sz = static_cast<int64_t>(j.Dk) * j.Dv;
  std::memcpy(j.s + t * sz, j.s0 + t * sz, sz * sizeof(float));
  DeltaArgs a;
  a.q = j.q + static_cast<int64_t>(t) * j.L * j.Dk;
  a.k = j.k + static_cast<int64_t>(t) * j.L * j.Dk;
  a.v = j.v + static_cast<int64_t>(t) * j.L * j.Dv;
  a.g = j.g + static_cast<int64_t>(t) * j.L;
  a.beta = j.beta + static_cast<int64_t>(t) * j.L;
  a.qs = a.ks = j.Dk;
  a.vs = a.os = j.Dv;
  a.L = j.L, a.Dk = j.Dk, a.Dv = j.Dv;
  a.S = j.s + t * sz;
  a.out = j.out + static_cast<int64_t>(t) * j.L * j.Dv;
  a.kv = kv.get(j.Dv);
  kernels().delta_rule(a);
}

class GatedDelta : public CpuPrimitive {
 public:
  explicit GatedDelta(mx::Stream s) : CpuPrimitive(s) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    for (auto& o : out) o.set_data(mx::allocator::malloc(o.nbytes()));
    auto& enc = encoder(stream(), in, out);
    const auto& k = in[1];
    const int B = k.shape(0), H = k.shape(1), L = k.shape(2), Dk = k.shape(3), Dv = in[2].shape(3);
    enc.dispatch([job = Job{in[0].data<float>(), in[1].data<float>(), in[2].data<float>(), in[3].data<float>(),
                            in[4].data<float>(), in[5].data<float>(), out[0].data<float>(), out[1].data<float>(),
                            L, Dk, Dv},
                  n = B * H]() mutable { Pool::get().run(n, &run_head, &job); });
  }

  const char* name() const override { return "Qwen3GatedDelta"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

}  // namespace

std::vector<mx::array> gated_delta(const mx::array& q, const mx::array& k, const mx::array& v, const mx::array& g,
                                   const mx::array& beta, const mx::array& state, mx::StreamOrDevice s) {
  Q3K_REQUIRE(k.ndim() == 4 && q.shape() == k.shape(), "q and k must be [B, H, L, Dk] alike, got " + shape_str(q) +
                                                       " and " + shape_str(k));
  const int B = k.shape(0), H = k.shape(1), L = k.shape(2), Dk = k.shape(3);
  Q3K_REQUIRE(v.ndim() == 4 && v.shape(0) == B && v.shape(1) == H && v.shape(2) == L, "v must be [B, H, L, Dv], got " +
                                                                                       shape_str(v));
  const int Dv = v.shape(3);
  Q3K_REQUIRE((g.shape() == mx::Shape{B, H, L} && beta.shape() == g.shape()), "g and beta must be [B, H, L]");
  Q3K_REQUIRE((state.shape() == mx::Shape{B, H, Dk, Dv}), "state must be [B, H, Dk, Dv], got " + shape_str(state));
  for (const auto* a : {&q, &k, &v, &g, &beta, &state}) Q3K_REQUIRE(a->dtype() == mx::float32, "inputs must be float32");
  Q3K_REQUIRE(Dk > 0 && Dv > 0, "head dims must be positive");
  auto stream = mx::to_stream(s);
  std::vector<mx::array> inputs;
  for (const auto* a : {&q, &k, &v, &g, &beta, &state}) inputs.push_back(as_input(*a, stream));
  return mx::array::make_arrays({v.shape(), state.shape()}, {mx::float32, mx::float32},
                                std::make_shared<GatedDelta>(stream), inputs);
}

}  // namespace q3k
