// DecoderLayers: whole decoder layers of a Qwen3 model (attention half, and the SwiGLU MLP half unless the
// layer's MLP is a mixture of experts) for one decoded position of one sequence, as one graph node.
//
// Why: unfused, a layer is ~22 graph nodes per decoded token (norms, three projections, reshapes,
// transposes, q/k norms, two RoPEs, the cache's slice updates, attention, o projection, residuals, the MLP).
// MLX schedules each node on its stream and our primitives wake the pool for each; on a 28-layer model with
// almost no weights that was ~6 ms of every step, where llama.cpp spends 1-2 ms. Here the same pieces run
// back to back on the stream thread with the pool kept busy between them, computing exactly what the
// unfused primitives compute (steps.h: the same serial functions; the same product kernels and tasks).
//
// The cache rows are written in place, as kv_append's are: nobody reads a cache buffer past its sequence's
// length, which is where the new row goes.
#include <algorithm>
#include <cstring>

#include "common.h"
#include "driver.h"
#include "int8.h"
#include "pool.h"
#include "steps.h"

namespace q3k {
namespace {

// A projection's layout: bits 4 or 8 (MLX affine: weight, scales, biases if `biases`), or 0 for a float32 or
// bfloat16 weight [N, K].
struct ProjSpec {
  int bits = 0, gs = 0;
  bool biases = false;
  bool operator==(const ProjSpec& o) const { return bits == o.bits && gs == o.gs && biases == o.biases; }
};

enum { kQ, kK, kV, kO, kGate, kUp, kDown, kProjs };

struct Proj {
  ProjSpec spec;
  const void *w = nullptr, *scales = nullptr, *biases = nullptr;
  WType wt = WType::F32;
  SType st = SType::F32;
  int64_t row_bytes = 0;
  int N = 0, K = 0;
};

struct Norm {
  const void* w = nullptr;
  bool bf16 = false;
};

struct Layer {
  Norm in, qn, kn, post;  // (the plan's arrays)
  Proj p[kProjs];
  const float *ksrc = nullptr, *vsrc = nullptr;  // the input buffers, when they must be copied first
  Layout kl{mx::Shape{}, mx::Strides{}}, vl{mx::Shape{}, mx::Strides{}};
  float *k = nullptr, *v = nullptr;  // the output buffers [Hkv, cap, D]
  int64_t cap = 0;
};

struct Params {
  int hidden = 0, H = 0, Hkv = 0, D = 0, inter = 0;
  int64_t offset = 0;
  float eps = 0, scale = 0, mscale = 1;
  bool mlp = true;
};

// Products of one activation row x [K] with `n` projections into ys, in one pool region (as one product
// primitive runs: the same kernels, chosen by one position).
void products(const Proj* const* ps, float* const* ys, int n, const float* x) {
  thread_local QuantizedActivations acts[3];
  thread_local std::vector<MatArgs> mats;
  mats.clear();
  for (int i = 0; i < n; ++i) {
    const Proj& p = *ps[i];
    MatArgs a;
    a.M = 1, a.path_rows = 1, a.N = p.N, a.K = p.K;
    a.w = p.w, a.w_row_bytes = p.row_bytes, a.wt = p.wt;
    a.y = ys[i], a.ldy = p.N;
    if (p.spec.bits == 0) {
      a.x = x, a.ldx = p.K;
    } else {
      int j = 0;  // projections of one layout share their prepared activations
      while (j < i && !(ps[j]->spec == p.spec)) ++j;
      if (j == i) acts[i].prepare(x, nullptr, 1, p.K, p.spec.gs, p.spec.bits, p.spec.biases, 1);
      a.gs = p.spec.gs, a.scales = p.scales, a.biases = p.biases, a.st = p.st;
      acts[j].into(a, 0);
    }
    mats.push_back(a);
  }
  run_products(kernels(), mats);
}

struct Buffers {
  float *xn, *q, *k, *v, *attn, *o, *g, *u;
};

void run_layer(const Params& P, const Layer& l, const float* inv_freq, float* h, const Buffers& b) {
  const int64_t D = P.D;
  rms_norm_rows(h, l.in.w, l.in.bf16, b.xn, 1, P.hidden, P.eps);
  {
    const Proj* ps[3] = {&l.p[kQ], &l.p[kK], &l.p[kV]};
    float* ys[3] = {b.q, b.k, b.v};
    products(ps, ys, 3, b.xn);
  }
  rms_norm_rows(b.q, l.qn.w, l.qn.bf16, b.q, P.H, P.D, P.eps);
  rms_norm_rows(b.k, l.kn.w, l.kn.bf16, b.k, P.Hkv, P.D, P.eps);
  rope_heads(b.q, inv_freq, P.H, P.D, P.offset, P.mscale, b.q);
  rope_heads(b.k, inv_freq, P.Hkv, P.D, P.offset, P.mscale, b.k);
  for (int64_t hh = 0; hh < P.Hkv; ++hh) {
    std::memcpy(l.k + (hh * l.cap + P.offset) * D, b.k + hh * D, sizeof(float) * D);
    std::memcpy(l.v + (hh * l.cap + P.offset) * D, b.v + hh * D, sizeof(float) * D);
  }
  const int64_t st[3] = {l.cap * D, D, 1};
  decode_attention_heads(b.q, P.H, P.D, l.k, st, l.v, st, P.Hkv, static_cast<int>(P.offset + 1), P.scale, b.attn);
  {
    const Proj* ps[1] = {&l.p[kO]};
    float* ys[1] = {b.o};
    products(ps, ys, 1, b.attn);
  }
  for (int i = 0; i < P.hidden; ++i) h[i] = h[i] + b.o[i];
  if (!P.mlp) return;
  rms_norm_rows(h, l.post.w, l.post.bf16, b.xn, 1, P.hidden, P.eps);
  {
    const Proj* ps[2] = {&l.p[kGate], &l.p[kUp]};
    float* ys[2] = {b.g, b.u};
    products(ps, ys, 2, b.xn);
  }
  // In the chunks the SwiGLU primitive uses (its kernel's vector body and tail fall on the same elements).
  constexpr int64_t kChunk = int64_t(1) << 14;
  for (int64_t lo = 0; lo < P.inter; lo += kChunk)
    kernels().swiglu(b.g + lo, b.u + lo, b.g + lo, std::min<int64_t>(P.inter - lo, kChunk));
  {
    const Proj* ps[1] = {&l.p[kDown]};
    float* ys[1] = {b.o};
    products(ps, ys, 1, b.g);
  }
  for (int i = 0; i < P.hidden; ++i) h[i] = h[i] + b.o[i];
}

int projs_per_layer(bool mlp) { return mlp ? kProjs : kGate; }

}  // namespace

// The weights of a run of layers, checked once, with the layers' pointers into them (the arrays are held here,
// evaluated and row-contiguous, so the pointers stay valid for the plan's life).
struct DecoderPlan::Data {
  Params P;
  std::vector<mx::array> held;
  std::vector<Layer> layers;  // without the cache buffers
};

namespace {

// Inputs: x, then each layer's key and value buffers. Outputs: the hidden state after the layers, then each
// layer's key and value buffers (the same memory: the new row written in place).
class DecoderLayers : public CpuPrimitive {
 public:
  DecoderLayers(mx::Stream s, std::shared_ptr<const DecoderPlan::Data> plan, int64_t offset)
      : CpuPrimitive(s), plan_(std::move(plan)), offset_(offset) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    auto& y = out[0];
    alloc_output(y);
    std::vector<Layer> layers = plan_->layers;
    for (size_t li = 0; li < layers.size(); ++li) {
      Layer& l = layers[li];
      for (int t = 0; t < 2; ++t) {
        const auto& buf = in[1 + 2 * li + t];
        auto& o = out[1 + 2 * li + t];
        if (buf.flags().row_contiguous) {
          o.copy_shared_buffer(buf);  // written in place: see the top of the file
        } else {
          o.set_data(mx::allocator::malloc(o.nbytes()));
          (t == 0 ? l.ksrc : l.vsrc) = buf.data<float>();
          (t == 0 ? l.kl : l.vl) = Layout(buf);
        }
        (t == 0 ? l.k : l.v) = o.data<float>();
      }
      l.cap = in[2 + 2 * li].shape(2);
    }
    auto& enc = encoder(stream(), in, out);
    Params P = plan_->P;
    P.offset = offset_;
    // The plan travels with the task: the primitive may be released before the task runs.
    enc.dispatch([P, plan = plan_, layers = std::move(layers), x = in[0].data<float>(), xl = Layout(in[0]),
                  h = y.data<float>()]() {
      thread_local Scratch scratch;
      const int64_t qd = static_cast<int64_t>(P.H) * P.D, kd = static_cast<int64_t>(P.Hkv) * P.D;
      // Each piece rounded up to 16 floats: every buffer starts 64-byte aligned, as the primitives' own do.
      auto up16 = [](int64_t n) { return (n + 15) & ~int64_t(15); };
      const int64_t hid = up16(P.hidden), inter = up16(P.inter);
      float* s = scratch.get(static_cast<size_t>(2 * hid + up16(qd) * 2 + up16(kd) * 2 + 2 * inter));
      Buffers b;
      b.xn = s, b.o = s + hid, b.q = b.o + hid, b.attn = b.q + up16(qd), b.k = b.attn + up16(qd),
      b.v = b.k + up16(kd), b.g = b.v + up16(kd), b.u = b.g + inter;
      if (xl.contiguous) {
        std::memcpy(h, x, sizeof(float) * P.hidden);
      } else {
        copy_rows(x, xl, h);
      }
      const float* inv_freq = plan->held[0].data<float>();
      for (const Layer& l : layers) {
        if (l.ksrc) copy_rows(l.ksrc, l.kl, l.k);
        if (l.vsrc) copy_rows(l.vsrc, l.vl, l.v);
        run_layer(P, l, inv_freq, h, b);
      }
    });
  }

  const char* name() const override { return "Qwen3DecoderLayers"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const DecoderLayers&>(other);
    return plan_ == o.plan_ && offset_ == o.offset_;
  }

 private:
  std::shared_ptr<const DecoderPlan::Data> plan_;
  int64_t offset_;
};

void check_norm(const mx::array& w, int n, const std::string& what) {
  Q3K_REQUIRE(w.ndim() == 1 && w.shape(0) == n && (w.dtype() == mx::float32 || w.dtype() == mx::bfloat16),
              what + " weight must be float32 or bfloat16 [" + std::to_string(n) + "], got " + shape_str(w));
}

// A weight the plan reads through raw pointers for its whole life: evaluated, row-contiguous.
mx::array settled(const mx::array& a) {
  mx::array r = a;
  if (!r.is_available()) r.eval();
  if (!r.flags().row_contiguous) {
    r = mx::contiguous(r, false, mx::Device::cpu);
    r.eval();
  }
  return r;
}

}  // namespace

DecoderPlan::DecoderPlan(const mx::array& inv_freq, const std::vector<mx::array>& arrays, const std::vector<int>& projs,
                         int heads, int kv_heads, float eps, float scale, float mscale, bool mlp) {
  const int nproj = projs_per_layer(mlp);
  Q3K_REQUIRE(!projs.empty() && projs.size() % (3 * nproj) == 0,
              "projs must hold (bits, group_size, biases) for each of the " + std::to_string(nproj) +
                  " projections of every layer");
  Q3K_REQUIRE(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && heads / kv_heads <= 16,
              "query heads " + std::to_string(heads) + " must be a multiple (at most 16x) of key/value heads " +
                  std::to_string(kv_heads));
  Q3K_REQUIRE(inv_freq.ndim() == 1 && inv_freq.dtype() == mx::float32 && inv_freq.shape(0) > 0,
              "inv_freq must be float32 [head_dim / 2], got " + shape_str(inv_freq));
  Q3K_REQUIRE(!arrays.empty() && arrays[0].ndim() == 1 && arrays[0].shape(0) > 0,
              "the first array must be the first layer's input norm weight [hidden]");
  auto d = std::make_shared<Data>();
  Params& P = d->P;
  P.hidden = arrays[0].shape(0), P.H = heads, P.Hkv = kv_heads, P.D = 2 * inv_freq.shape(0), P.eps = eps;
  P.scale = scale, P.mscale = mscale, P.mlp = mlp, P.inter = -1;
  const int hidden = P.hidden, D = P.D;
  d->held.push_back(settled(inv_freq));
  const int nlayers = static_cast<int>(projs.size() / (3 * nproj));
  size_t c = 0;
  auto next = [&](const char* what) -> mx::array {
    Q3K_REQUIRE(c < arrays.size(), std::string("arrays end before ") + what);
    d->held.push_back(settled(arrays[c++]));
    return d->held.back();
  };
  for (int li = 0; li < nlayers; ++li) {
    const std::string at = "layer " + std::to_string(li) + ": ";
    Layer l;
    Norm* norms[4] = {&l.in, &l.qn, &l.kn, &l.post};
    const int sizes[4] = {hidden, D, D, hidden};
    const char* names[4] = {"input norm", "q norm", "k norm", "post-attention norm"};
    for (int i = 0; i < (mlp ? 4 : 3); ++i) {
      const mx::array w = next(names[i]);
      check_norm(w, sizes[i], at + names[i]);
      norms[i]->w = w.data<void>(), norms[i]->bf16 = w.dtype() == mx::bfloat16;
    }
    for (int j = 0; j < nproj; ++j) {
      const int* f = &projs[3 * (li * nproj + j)];
      Proj& pr = l.p[j];
      pr.spec = ProjSpec{f[0], f[1], f[2] != 0};
      const mx::array w = next("a projection");
      if (pr.spec.bits == 0) {
        Q3K_REQUIRE(w.ndim() == 2 && (w.dtype() == mx::float32 || w.dtype() == mx::bfloat16),
                    at + "a float projection must be float32 or bfloat16 [N, K], got " + shape_str(w));
        pr.N = w.shape(0), pr.K = w.shape(1), pr.wt = w.dtype() == mx::bfloat16 ? WType::BF16 : WType::F32;
        pr.row_bytes = static_cast<int64_t>(pr.K) * w.itemsize();
      } else {
        Q3K_REQUIRE(w.ndim() == 2 && (pr.spec.bits == 4 || pr.spec.bits == 8),
                    at + "a quantized projection must be [N, K * bits / 32] of 4 or 8 bits, got " + shape_str(w));
        pr.K = static_cast<int>(static_cast<int64_t>(w.shape(1)) * 32 / pr.spec.bits);
        const mx::array sc = next("scales");
        std::optional<mx::array> bi;
        if (pr.spec.biases) bi = next("biases");
        pr.N = check_quantized(w, sc, bi, pr.K, pr.spec.gs, pr.spec.bits, 0);
        pr.wt = pr.spec.bits == 4 ? WType::Q4 : WType::Q8;
        pr.row_bytes = static_cast<int64_t>(pr.K) * pr.spec.bits / 8;
        pr.st = scale_type(sc.dtype()), pr.scales = sc.data<void>(), pr.biases = bi ? bi->data<void>() : nullptr;
      }
      pr.w = w.data<void>();
      if (j == kGate && P.inter < 0) P.inter = pr.N;
      const int want_n[kProjs] = {heads * D, kv_heads * D, kv_heads * D, hidden, P.inter, P.inter, hidden};
      const int want_k[kProjs] = {hidden, hidden, hidden, heads * D, hidden, hidden, P.inter};
      Q3K_REQUIRE(pr.N == want_n[j] && pr.K == want_k[j],
                  at + "projection " + std::to_string(j) + " is [" + std::to_string(pr.N) + ", " + std::to_string(pr.K) +
                      "], expected [" + std::to_string(want_n[j]) + ", " + std::to_string(want_k[j]) + "]");
    }
    d->layers.push_back(l);
  }
  Q3K_REQUIRE(c == arrays.size(), "more arrays than the projections describe");
  if (!mlp) P.inter = 0;
  data_ = std::move(d);
}

int DecoderPlan::layers() const { return static_cast<int>(data_->layers.size()); }

std::vector<mx::array> DecoderPlan::operator()(const mx::array& x, const std::vector<mx::array>& kv, int64_t offset,
                                               mx::StreamOrDevice s) const {
  const Params& P = data_->P;
  Q3K_REQUIRE(x.dtype() == mx::float32 && x.ndim() >= 1 && x.shape(-1) == P.hidden &&
                  x.size() == static_cast<size_t>(P.hidden),
              "the decoder layers take one float32 position [..., " + std::to_string(P.hidden) + "], got " +
                  shape_str(x));
  Q3K_REQUIRE(kv.size() == 2 * data_->layers.size(),
              "one key and one value buffer per layer (" + std::to_string(2 * data_->layers.size()) + "), got " +
                  std::to_string(kv.size()));
  Q3K_REQUIRE(offset >= 0 && offset < (int64_t(1) << 31) - 1, "offset out of range");
  std::vector<mx::array> inputs = {x};
  std::vector<mx::Shape> shapes = {x.shape()};
  std::vector<uintptr_t> ids;
  for (const auto& a : kv) ids.push_back(a.id());
  std::sort(ids.begin(), ids.end());
  Q3K_REQUIRE(std::adjacent_find(ids.begin(), ids.end()) == ids.end(),
              "each key and value buffer must be its own array (the rows are written in place)");
  for (size_t i = 0; i < kv.size(); ++i) {
    const auto& buf = kv[i];
    const char* what = i % 2 ? "value buffer" : "key buffer";
    Q3K_REQUIRE(buf.ndim() == 4 && buf.shape(0) == 1 && buf.shape(1) == P.Hkv && buf.shape(3) == P.D &&
                    buf.dtype() == mx::float32 && buf.shape(2) == kv[i - i % 2].shape(2),
                "layer " + std::to_string(i / 2) + ": " + what + " must be float32 [1, " + std::to_string(P.Hkv) +
                    ", capacity, " + std::to_string(P.D) + "] (both of one capacity), got " + shape_str(buf));
    Q3K_REQUIRE(offset < buf.shape(2), "layer " + std::to_string(i / 2) + ": position " + std::to_string(offset) +
                                           " does not fit a " + what + " of " + std::to_string(buf.shape(2)));
    inputs.push_back(buf);
    shapes.push_back(buf.shape());
  }
  auto stream = mx::to_stream(s);
  return mx::array::make_arrays(std::move(shapes), std::vector<mx::Dtype>(shapes.size(), mx::float32),
                                std::make_shared<DecoderLayers>(stream, data_, offset), inputs);
}

}  // namespace q3k
