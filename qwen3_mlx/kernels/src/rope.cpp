// RoPE: rotary position embedding over whole heads in HF's layout (the two halves of each head
// rotate together), positions offset..offset+L-1, one offset per batch row or one for all (a batch of
// sequences at different lengths). MLX's CPU path for mx.fast.rope is a composition of
// ~20 ops per call (arange, exp, cos, sin, slices, products, concatenate), two calls per layer.
#include <cmath>
#include <variant>
#include <vector>

#include "common.h"
#include "driver.h"
#include "pool.h"
#include "steps.h"

namespace q3k {
namespace {

struct Job {
  const float* x;
  const float* inv_freq;  // [D / 2]
  float* out;             // [B, H, L, D] contiguous
  int64_t xst[4];         // element strides of x [b, h, l, d]
  int B, H, L, D;
  int pos_per_task;
  int64_t offset;          // every row's, unless per_row
  const int64_t* per_row;  // [B] or null
  float mscale;
};

// cos [half] then sin [half] of positions offset + l0 .. offset + l1 - 1, into cs.
void angles(const Job& j, int64_t offset, int l0, int l1, float* cs) {
  const int half = j.D / 2;
  for (int l = l0; l < l1; ++l) {
    // As MLX: the position in float32, times the inverse frequency in float32, then the angle's cos/sin.
    const float pos = static_cast<float>(l) + static_cast<float>(offset);
    float* c = cs + static_cast<int64_t>(l - l0) * j.D;
    for (int i = 0; i < half; ++i) {
      const float theta = pos * j.inv_freq[i];
      c[i] = std::cos(theta);
      c[half + i] = std::sin(theta);
    }
  }
}

// One block of positions for every head: the angles of a position are computed once and shared
// (per batch row when the rows have offsets of their own).
void run_positions(void* ctx, int t, int) {
  thread_local Scratch table;
  const Job& j = *static_cast<Job*>(ctx);
  const int half = j.D / 2;
  const int l0 = t * j.pos_per_task, l1 = std::min(j.L, l0 + j.pos_per_task);
  float* cs = table.get(static_cast<size_t>(l1 - l0) * j.D);  // per position: cos [half], sin [half]
  if (!j.per_row) angles(j, j.offset, l0, l1, cs);
  for (int b = 0; b < j.B; ++b) {
    if (j.per_row) angles(j, j.per_row[b], l0, l1, cs);
    for (int h = 0; h < j.H; ++h)
      for (int l = l0; l < l1; ++l) {
        const float* x = j.x + b * j.xst[0] + h * j.xst[1] + l * j.xst[2];
        const int64_t ds = j.xst[3];
        float* y = j.out + ((static_cast<int64_t>(b) * j.H + h) * j.L + l) * j.D;
        const float* c = cs + static_cast<int64_t>(l - l0) * j.D;
        const float* s = c + half;
        const float m = j.mscale;
        for (int i = 0; i < half; ++i) {
          // The caller's input scaling (YaRN's attention factor) rounds first, as a separate multiply would.
          const float x1 = m == 1.f ? x[i * ds] : x[i * ds] * m;
          const float x2 = m == 1.f ? x[(half + i) * ds] : x[(half + i) * ds] * m;
          const float a = x1 * c[i], bb = x2 * s[i], e = x1 * s[i], f = x2 * c[i];
          y[i] = a - bb;
          y[half + i] = e + f;
        }
      }
  }
}

class RoPE : public CpuPrimitive {
 public:
  RoPE(mx::Stream s, std::vector<int64_t> offsets, float mscale)
      : CpuPrimitive(s), offsets_(std::move(offsets)), mscale_(mscale) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const auto& x = in[0];
    const auto& f = in[1];
    auto& y = out[0];
    alloc_output(y);
    auto& enc = encoder(stream(), in, out);
    Job job{x.data<float>(), f.data<float>(), y.data<float>(), {}, x.shape(0), x.shape(1), x.shape(2), x.shape(3),
            1, offsets_[0], nullptr, mscale_};
    for (int i = 0; i < 4; ++i) job.xst[i] = x.strides()[i];
    // Blocks of ~16K values: a decoded token stays on the stream thread.
    const int64_t per_pos = std::max<int64_t>(1, static_cast<int64_t>(job.B) * job.H * job.D);
    job.pos_per_task = static_cast<int>(std::max<int64_t>(1, (int64_t(1) << 14) / per_pos));
    // Per-row offsets travel with the task (the primitive may be released before the task runs).
    std::vector<int64_t> rows = offsets_.size() > 1 ? offsets_ : std::vector<int64_t>{};
    enc.dispatch([job, rows = std::move(rows)]() mutable {
      if (!rows.empty()) job.per_row = rows.data();
      Pool::get().run((job.L + job.pos_per_task - 1) / job.pos_per_task, &run_positions, &job);
    });
  }

  const char* name() const override { return "Qwen3RoPE"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const RoPE&>(other);
    return offsets_ == o.offsets_ && mscale_ == o.mscale_;
  }

 private:
  std::vector<int64_t> offsets_;
  float mscale_;
};

}  // namespace

void rope_heads(const float* x, const float* inv_freq, int H, int D, int64_t pos, float mscale, float* out) {
  Job job{x, inv_freq, out, {static_cast<int64_t>(H) * D, D, D, 1}, 1, H, 1, D, 1, pos, nullptr, mscale};
  run_positions(&job, 0, 0);
}

mx::array rope(const mx::array& x, const mx::array& inv_freq, const std::variant<int64_t, std::vector<int64_t>>& offset,
               float mscale, mx::StreamOrDevice s) {
  Q3K_REQUIRE(x.ndim() == 4, "rope input must be [B, heads, length, head_dim], got " + shape_str(x));
  Q3K_REQUIRE(x.dtype() == mx::float32, "rope input must be float32");
  Q3K_REQUIRE(x.shape(3) % 2 == 0 && x.shape(3) > 0, "rope head_dim must be even, got " + shape_str(x));
  Q3K_REQUIRE(inv_freq.ndim() == 1 && inv_freq.shape(0) == x.shape(3) / 2 && inv_freq.dtype() == mx::float32,
          "rope inv_freq must be float32 [head_dim / 2], got " + shape_str(inv_freq));
  std::vector<int64_t> offsets = std::holds_alternative<int64_t>(offset) ? std::vector<int64_t>{std::get<int64_t>(offset)}
                                                                          : std::get<std::vector<int64_t>>(offset);
  Q3K_REQUIRE(offsets.size() == 1 || static_cast<int64_t>(offsets.size()) == x.shape(0),
          "rope takes one offset or one per batch row (" + std::to_string(x.shape(0)) + "), got " +
              std::to_string(offsets.size()));
  for (auto o : offsets) Q3K_REQUIRE(o >= 0, "rope offset must be non-negative");
  auto stream = mx::to_stream(s);
  // x is read at its strides (typically the transposed view of a projection): no copy node.
  return mx::array(x.shape(), mx::float32, std::make_shared<RoPE>(stream, std::move(offsets), mscale),
                   {x, as_input(inv_freq, stream)});
}

}  // namespace q3k
