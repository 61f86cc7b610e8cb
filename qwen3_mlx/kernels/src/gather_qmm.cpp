// GatherQMatmul / GatherMatmul: the experts of a mixture-of-experts layer, each (token, expert) pair
// multiplied by only its expert's weight (quantized, or float32 / bfloat16). Pairs are grouped by expert inside the kernel, so each chosen
// expert's weight is read once per call whether the pairs arrive sorted or not.
#include <cstring>

#include "common.h"
#include "driver.h"
#include "int8.h"

namespace q3k {
namespace {

// The (token, expert) pairs of one call grouped by expert: the pairs of expert e are
// order[count[e] .. count[e + 1]), and srcrow[i] is the x row of sorted pair i. x and the ids are made
// contiguous first if strided; a pair whose id is outside [0, E) gets a zero output row and no place.
struct Groups {
  const float* x;
  const int32_t *count, *order, *srcrow;
  int valid;
};

Groups group_pairs(const float* xp, const Layout& xl, const int32_t* ip, const Layout& il, int P, int E, int N,
                   int per_row, float* yp) {
  thread_local std::vector<int32_t> count, order, srcrow, fill, iraw;
  thread_local Scratch xraw;
  if (!xl.contiguous) {
    int64_t n = 1;
    for (auto d : xl.shape) n *= d;
    float* c = xraw.get(static_cast<size_t>(n));
    copy_rows(xp, xl, c);
    xp = c;
  }
  if (!il.contiguous) {
    iraw.resize(P);
    copy_rows(ip, il, iraw.data());
    ip = iraw.data();
  }
  count.assign(E + 1, 0);
  for (int p = 0; p < P; ++p) {
    const int e = ip[p];
    if (e >= 0 && e < E) ++count[e + 1];
  }
  for (int e = 0; e < E; ++e) count[e + 1] += count[e];
  order.resize(P), srcrow.resize(P);
  fill.assign(count.begin(), count.end() - 1);
  for (int p = 0; p < P; ++p) {
    const int e = ip[p];
    if (e >= 0 && e < E) {
      order[fill[e]++] = p;
    } else {
      std::memset(yp + static_cast<int64_t>(p) * N, 0, sizeof(float) * N);
    }
  }
  const int valid = count[E];
  for (int i = 0; i < valid; ++i) srcrow[i] = per_row > 1 ? order[i] / per_row : order[i];
  return {xp, count.data(), order.data(), srcrow.data(), valid};
}

// One product per expert that has pairs: its rows of the gathered activations (sorted pairs lo.. of
// expert e) against its weight, both of which `set(a, e, lo)` fills in, written back to the pairs' output rows.
template <class Set>
void run_experts(const Groups& g, int E, int N, int K, int path_rows, float* yp, Set set) {
  thread_local std::vector<MatArgs> mats;
  mats.clear();
  for (int e = 0; e < E; ++e) {
    const int lo = g.count[e], n = g.count[e + 1] - lo;
    if (n == 0) continue;
    MatArgs a;
    a.M = n, a.path_rows = path_rows, a.N = N, a.K = K;
    a.y = yp, a.ldy = N, a.yrows = g.order + lo;
    set(a, e, lo);
    mats.push_back(a);
  }
  run_products(kernels(), mats);
}

// The lead shape of x against indices: one x row per pair (1) or per token shared by its k pairs (k).
int pairs_per_row(const mx::array& x, const mx::array& indices) {
  mx::Shape lead(x.shape().begin(), x.shape().end() - 1);
  if (lead == indices.shape()) return 1;
  mx::Shape tokens(indices.shape().begin(), indices.shape().end() - 1);
  Q3K_REQUIRE(lead == tokens, "x " + shape_str(x) + " does not match indices " + shape_str(indices));
  return indices.shape(-1);
}

// indices [..., L, k]: the kernel is chosen by a sequence's L positions, not by how many pairs an expert
// got (which depends on the other sequences of a batch and on how a prompt is chunked).
int sequence_rows(const mx::array& indices) { return indices.ndim() >= 2 ? indices.shape(-2) : 1; }

class GatherQMatmul : public CpuPrimitive {
 public:
  GatherQMatmul(mx::Stream s, int group_size, int bits, bool has_biases, int pairs_per_row)
      : CpuPrimitive(s), gs_(group_size), bits_(bits), has_biases_(has_biases), per_row_(pairs_per_row) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const auto& x = in[0];
    const auto& w = in[1];
    const auto& scales = in[2];
    const auto& idx = in[has_biases_ ? 4 : 3];
    auto& y = out[0];
    alloc_output(y);
    auto& enc = encoder(stream(), in, out);
    const int E = w.shape(0), N = w.shape(1), K = x.shape(-1);
    const int P = static_cast<int>(idx.size()), L = sequence_rows(idx);
    enc.dispatch([xp = x.data<float>(), xl = Layout(x), il = Layout(idx), wp = w.data<uint8_t>(), sp = scales.data<uint8_t>(),
                  bp = has_biases_ ? in[3].data<uint8_t>() : nullptr, ip = idx.data<int32_t>(), yp = y.data<float>(),
                  st = scale_type(scales.dtype()), ssize = static_cast<int>(scales.itemsize()), E, N, K, P, L,
                  gs = gs_, bits = bits_, per_row = per_row_]() mutable {
      thread_local QuantizedActivations acts;
      const Groups g = group_pairs(xp, xl, ip, il, P, E, N, per_row, yp);
      const int G = K / gs;
      acts.prepare(g.x, g.srcrow, g.valid, K, gs, bits, bp != nullptr, L);
      const int64_t row_bytes = static_cast<int64_t>(K) * bits / 8;
      run_experts(g, E, N, K, L, yp, [&](MatArgs& a, int e, int lo) {
        acts.into(a, lo);
        a.w = wp + static_cast<int64_t>(e) * N * row_bytes, a.w_row_bytes = row_bytes;
        a.wt = bits == 4 ? WType::Q4 : WType::Q8;
        a.scales = sp + static_cast<int64_t>(e) * N * G * ssize;
        a.biases = bp ? bp + static_cast<int64_t>(e) * N * G * ssize : nullptr;
        a.st = st, a.gs = gs;
      });
    });
  }

  const char* name() const override { return "Qwen3GatherQMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const GatherQMatmul&>(other);
    return gs_ == o.gs_ && bits_ == o.bits_ && has_biases_ == o.has_biases_ && per_row_ == o.per_row_;
  }

 private:
  int gs_, bits_;
  bool has_biases_;
  int per_row_;
};

// GatherMatmul: the same for float32 or bfloat16 expert stacks [E, N, K] (bfloat16 widened in registers).
class GatherMatmul : public CpuPrimitive {
 public:
  GatherMatmul(mx::Stream s, int pairs_per_row) : CpuPrimitive(s), per_row_(pairs_per_row) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const auto& x = in[0];
    const auto& w = in[1];
    const auto& idx = in[2];
    auto& y = out[0];
    alloc_output(y);
    auto& enc = encoder(stream(), in, out);
    const int E = w.shape(0), N = w.shape(1), K = x.shape(-1);
    const int P = static_cast<int>(idx.size()), L = sequence_rows(idx);
    enc.dispatch([xp = x.data<float>(), xl = Layout(x), il = Layout(idx), wp = w.data<uint8_t>(),
                  bf16 = w.dtype() == mx::bfloat16, isz = static_cast<int64_t>(w.itemsize()), ip = idx.data<int32_t>(),
                  yp = y.data<float>(), E, N, K, P, L, per_row = per_row_]() mutable {
      thread_local Scratch xbuf;
      const Groups g = group_pairs(xp, xl, ip, il, P, E, N, per_row, yp);
      float* xg = xbuf.get(static_cast<size_t>(g.valid) * K);
      prepare_x(kernels(), g.x, g.srcrow, g.valid, K, 1, false, xg, nullptr);
      run_experts(g, E, N, K, L, yp, [&](MatArgs& a, int e, int lo) {
        a.x = xg + static_cast<int64_t>(lo) * K, a.ldx = K;
        a.w = wp + static_cast<int64_t>(e) * N * K * isz, a.w_row_bytes = K * isz;
        a.wt = bf16 ? WType::BF16 : WType::F32;
      });
    });
  }

  const char* name() const override { return "Qwen3GatherMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return per_row_ == static_cast<const GatherMatmul&>(other).per_row_;
  }

 private:
  int per_row_;
};

}  // namespace

mx::array gather_mm(const mx::array& x, const mx::array& w, const mx::array& indices, mx::StreamOrDevice s) {
  Q3K_REQUIRE(x.ndim() >= 1 && indices.ndim() >= 1, "x and indices must have at least one dim");
  Q3K_REQUIRE(mx::issubdtype(indices.dtype(), mx::integer), "indices must be integers");
  Q3K_REQUIRE(w.ndim() == 3 && w.shape(2) == x.shape(-1), "expert weights " + shape_str(w) + " do not match x " + shape_str(x));
  Q3K_REQUIRE(w.dtype() == mx::float32 || w.dtype() == mx::bfloat16, "expert weights must be float32 or bfloat16");
  Q3K_REQUIRE(x.shape(-1) > 0, "input dims must be positive");
  const int per_row = pairs_per_row(x, indices);
  auto stream = mx::to_stream(s);
  auto shape = indices.shape();
  shape.push_back(w.shape(1));
  return mx::array(shape, mx::float32, std::make_shared<GatherMatmul>(stream, per_row),
                   {mx::astype(x, mx::float32, stream), as_input(w, stream), mx::astype(indices, mx::int32, stream)});
}

mx::array gather_qmm(const mx::array& x, const mx::array& w, const mx::array& scales,
                     const std::optional<mx::array>& biases, const mx::array& indices, int group_size, int bits,
                     mx::StreamOrDevice s) {
  Q3K_REQUIRE(x.ndim() >= 1, "x must have at least one dim");
  Q3K_REQUIRE(indices.ndim() >= 1, "indices must have at least one dim");
  Q3K_REQUIRE(mx::issubdtype(indices.dtype(), mx::integer), "indices must be integers");
  const int K = x.shape(-1);
  const int N = check_quantized(w, scales, biases, K, group_size, bits, 1);
  const int per_row = pairs_per_row(x, indices);
  auto stream = mx::to_stream(s);
  auto shape = indices.shape();
  shape.push_back(N);
  std::vector<mx::array> inputs = {mx::astype(x, mx::float32, stream),
                                   as_input(w, stream), as_input(scales, stream)};
  if (biases) inputs.push_back(as_input(*biases, stream));
  inputs.push_back(mx::astype(indices, mx::int32, stream));
  auto y = mx::array(shape, mx::float32,
                     std::make_shared<GatherQMatmul>(stream, group_size, bits, biases.has_value(), per_row),
                     std::move(inputs));
  return mx::astype(y, float_out(mx::promote_types(x.dtype(), scales.dtype())), stream);
}

}  // namespace q3k
