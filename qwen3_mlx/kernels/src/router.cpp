// Router: a mixture-of-experts gate's softmax, top-k and optional renormalisation in one pass per
// token (MLX runs them as five ops: softmax, argpartition, slice, take_along_axis, sum/divide).
#include <cmath>

#include "common.h"
#include "driver.h"

namespace q3k {
namespace {

class Router : public CpuPrimitive {
 public:
  Router(mx::Stream s, int k, bool norm) : CpuPrimitive(s), k_(k), norm_(norm) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const auto& logits = in[0];
    auto& inds = out[0];
    auto& scores = out[1];
    inds.set_data(mx::allocator::malloc(inds.nbytes()));
    scores.set_data(mx::allocator::malloc(scores.nbytes()));
    auto& enc = encoder(stream(), in, out);
    const int E = logits.shape(-1);
    const int64_t T = E > 0 ? static_cast<int64_t>(logits.size()) / E : 0;
    enc.dispatch([lp = logits.data<float>(), ll = Layout(logits), ip = inds.data<uint32_t>(),
                  sp = scores.data<float>(), T, E, k = k_, norm = norm_]() mutable {
      thread_local Scratch raw, probs;
      if (!ll.contiguous) {
        float* c = raw.get(static_cast<size_t>(T) * E);
        copy_rows(lp, ll, c);
        lp = c;
      }
      float* p = probs.get(static_cast<size_t>(E));
      for (int64_t t = 0; t < T; ++t) {
        const float* l = lp + t * E;
        float top = l[0];
        for (int e = 1; e < E; ++e) top = l[e] > top ? l[e] : top;
        float sum = 0.f;
        for (int e = 0; e < E; ++e) sum += (p[e] = std::exp(l[e] - top));
        const float inv = 1.f / sum;
        // k largest by repeated selection (k is small: 8 of 128 for Qwen3's MoE); ties go to the lower id.
        uint32_t* it = ip + t * k;
        float* st = sp + t * k;
        float picked = 0.f;
        for (int j = 0; j < k; ++j) {
          int best = -1;
          for (int e = 0; e < E; ++e)
            if (p[e] >= 0.f && (best < 0 || p[e] > p[best])) best = e;
          it[j] = static_cast<uint32_t>(best);
          st[j] = p[best] * inv;
          picked += st[j];
          p[best] = -1.f;  // taken
        }
        if (norm)
          for (int j = 0; j < k; ++j) st[j] /= picked;
      }
    });
  }

  const char* name() const override { return "Qwen3Router"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Router&>(other);
    return k_ == o.k_ && norm_ == o.norm_;
  }

 private:
  int k_;
  bool norm_;
};

}  // namespace

std::vector<mx::array> route(const mx::array& logits, int k, bool norm_topk_prob, mx::StreamOrDevice s) {
  Q3K_REQUIRE(logits.ndim() >= 1 && logits.shape(-1) >= 1, "logits must have an experts axis");
  Q3K_REQUIRE(k >= 1 && k <= logits.shape(-1), "k must be in [1, experts], got " + std::to_string(k));
  auto stream = mx::to_stream(s);
  auto shape = logits.shape();
  shape.back() = k;
  return mx::array::make_arrays({shape, shape}, {mx::uint32, mx::float32},
                                std::make_shared<Router>(stream, k, norm_topk_prob),
                                {mx::astype(logits, mx::float32, stream)});
}

}  // namespace q3k
