// Attention on the CPU, K and V read in place (a slice of the cache's larger buffer, no copy):
// - DecodeAttention: one query row per head, fused scores + softmax + weighted sum;
// - FlashAttention: many query rows (prefill), blocked over keys with an online softmax, so no
//   [heads, queries, keys] score matrix is ever held (MLX's CPU attention materialises it in float32 and
//   runs both products through the BLAS the wheel links, a reference one on Linux).
#include <algorithm>
#include <cmath>

#include "common.h"
#include "driver.h"
#include "pool.h"

namespace q3k {
namespace {

constexpr int kMaxRep = 16;  // query heads per key/value head (Qwen3 goes up to 16)

struct Job {
  const float *q, *k, *v;
  float* out;
  int64_t kst[4], vst[4];  // element strides [b, h, s, d]
  int B, H, Hkv, S, D;
  float scale;
  // Split-K over long caches: each (b, kv head) is cut into `splits` key ranges of `chunk` keys, whose
  // unnormalised outputs and row max / exp-sum go to `part` [B * Hkv * splits][rep * (D + 2)].
  int splits = 1, chunk = 0;
  float* part = nullptr;
};

// Rows of a strided [S, D] view as contiguous rows (only when its last axis is strided).
const float* rows(const float* p, const int64_t* st, int S, int D, Scratch& buf, int64_t* row_stride) {
  if (st[3] == 1) {
    *row_stride = st[2];
    return p;
  }
  float* c = buf.get(static_cast<size_t>(S) * D);
  copy_rows(p, Layout({S, D}, {st[2], st[3]}), c);
  *row_stride = D;
  return c;
}

void run_head(void* ctx, int t, int) {
  thread_local Scratch scores, kbuf, vbuf;
  const Job& j = *static_cast<Job*>(ctx);
  const int split = t % j.splits, bh = t / j.splits;
  const int b = bh / j.Hkv, h = bh % j.Hkv, rep = j.H / j.Hkv;
  const int s0 = split * j.chunk, n = std::min(j.S, s0 + j.chunk) - s0;
  AttnArgs a;
  a.rep = rep, a.S = n, a.D = j.D, a.scale = j.scale;
  a.q = j.q + (static_cast<int64_t>(b) * j.H + static_cast<int64_t>(h) * rep) * j.D;
  const float* k = j.k + b * j.kst[0] + h * j.kst[1] + s0 * j.kst[2];
  const float* v = j.v + b * j.vst[0] + h * j.vst[1] + s0 * j.vst[2];
  a.k = rows(k, j.kst, n, j.D, kbuf, &a.ks);
  a.v = rows(v, j.vst, n, j.D, vbuf, &a.vs);
  a.scores = scores.get(static_cast<size_t>(rep) * n);
  if (j.splits == 1) {
    a.out = j.out + (static_cast<int64_t>(b) * j.H + static_cast<int64_t>(h) * rep) * j.D;
  } else {
    float* p = j.part + static_cast<int64_t>(t) * rep * (j.D + 2);
    a.out = p, a.row_max = p + rep * j.D, a.row_sum = a.row_max + rep;
  }
  kernels().attend(a);
}

// Merges the key ranges of one (b, kv head): out = sum_i o_i e^(m_i - M) / sum_i l_i e^(m_i - M).
void merge_splits(const Job& j) {
  const int rep = j.H / j.Hkv;
  const int64_t stride = static_cast<int64_t>(rep) * (j.D + 2);
  for (int bh = 0; bh < j.B * j.Hkv; ++bh) {
    const float* base = j.part + static_cast<int64_t>(bh) * j.splits * stride;
    float* out = j.out + static_cast<int64_t>(bh) * rep * j.D;  // heads bh*rep .. : [B, H] flattened
    for (int r = 0; r < rep; ++r) {
      float M = -INFINITY;
      for (int i = 0; i < j.splits; ++i) M = std::max(M, base[i * stride + rep * j.D + r]);
      float denom = 0.f;
      float* o = out + static_cast<int64_t>(r) * j.D;
      for (int d = 0; d < j.D; ++d) o[d] = 0.f;
      for (int i = 0; i < j.splits; ++i) {
        const float* p = base + i * stride;
        const float w = std::exp(p[rep * j.D + r] - M);
        denom += w * p[rep * j.D + rep + r];
        for (int d = 0; d < j.D; ++d) o[d] += w * p[static_cast<int64_t>(r) * j.D + d];
      }
      const float inv = 1.f / denom;
      for (int d = 0; d < j.D; ++d) o[d] *= inv;
    }
  }
}

class DecodeAttention : public CpuPrimitive {
 public:
  DecodeAttention(mx::Stream s, float scale) : CpuPrimitive(s), scale_(scale) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const auto& q = in[0];
    const auto& k = in[1];
    const auto& v = in[2];
    auto& y = out[0];
    alloc_output(y);
    auto& enc = encoder(stream(), in, out);
    Job job{q.data<float>(), k.data<float>(), v.data<float>(), y.data<float>(), {}, {}, q.shape(0), q.shape(1),
            k.shape(1), k.shape(2), q.shape(3), scale_};
    for (int i = 0; i < 4; ++i) job.kst[i] = k.strides()[i], job.vst[i] = v.strides()[i];
    // Fewer (b, kv head) pairs than twice the threads: split long caches into key ranges of at least
    // 512 keys, so every thread streams its share of K and V once (then a small merge).
    const int heads = job.B * job.Hkv, threads = Pool::get().size();
    if (heads < 2 * threads && job.S >= 1024) {
      const int want = (2 * threads + heads - 1) / heads;
      job.splits = std::max(1, std::min(want, job.S / 512));
      job.chunk = (job.S + job.splits - 1) / job.splits;
      job.splits = (job.S + job.chunk - 1) / job.chunk;
    } else {
      job.chunk = job.S;
    }
    enc.dispatch([job, ql = Layout(q)]() mutable {
      thread_local Scratch qbuf, parts;
      if (!ql.contiguous) {
        float* c = qbuf.get(static_cast<size_t>(job.B) * job.H * job.D);
        copy_rows(job.q, ql, c);
        job.q = c;
      }
      if (job.splits > 1)
        job.part = parts.get(static_cast<size_t>(job.B) * job.H * job.splits * (job.D + 2));
      Pool::get().run(job.B * job.Hkv * job.splits, &run_head, &job);
      if (job.splits > 1) merge_splits(job);
    });
  }

  const char* name() const override { return "Qwen3DecodeAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return scale_ == static_cast<const DecodeAttention&>(other).scale_;
  }

 private:
  float scale_;
};

// ---- prefill ----

struct FlashJob {
  const float *q, *k, *v;
  float* out;
  int64_t qst[4], kst[4], vst[4];  // element strides [b, h, l, d]
  int B, H, Hkv, L, S, D;
  int nq;       // query positions per task
  int nblocks;  // query blocks per (b, kv head)
  bool causal;
  float scale;
};

void run_flash(void* ctx, int t, int) {
  thread_local Scratch qbuf, kt, vp, sbuf, obuf, mbuf, lbuf;
  const FlashJob& j = *static_cast<FlashJob*>(ctx);
  const Kernels& K = kernels();
  // Causal blocks late in the sequence see the most keys: hand those out first.
  const int blk = j.nblocks - 1 - t % j.nblocks, bh = t / j.nblocks;
  const int b = bh / j.Hkv, hkv = bh % j.Hkv, rep = j.H / j.Hkv;
  const int l0 = blk * j.nq, nq = std::min(j.nq, j.L - l0);
  FlashArgs a;
  a.R = rep * nq, a.nq = nq, a.D = j.D, a.S = j.S, a.causal = j.causal;
  a.Dp = (j.D + K.flash_dpad - 1) / K.flash_dpad * K.flash_dpad;
  a.first_limit = j.S - j.L + l0;  // the keys end where the queries end
  // The task's query rows, scaled first as MLX does (q * scale, then the product).
  float* q = qbuf.get(static_cast<size_t>(a.R) * j.D);
  for (int h = 0; h < rep; ++h)
    for (int i = 0; i < nq; ++i) {
      const float* src = j.q + b * j.qst[0] + (hkv * rep + h) * j.qst[1] + (l0 + i) * j.qst[2];
      float* dst = q + (static_cast<int64_t>(h) * nq + i) * j.D;
      for (int d = 0; d < j.D; ++d) dst[d] = src[d * j.qst[3]] * j.scale;
    }
  a.q = q;
  a.k = j.k + b * j.kst[0] + hkv * j.kst[1], a.ks = j.kst[2], a.kd = j.kst[3];
  a.v = j.v + b * j.vst[0] + hkv * j.vst[1], a.vs = j.vst[2], a.vd = j.vst[3];
  a.out = j.out + ((static_cast<int64_t>(b) * j.H + hkv * rep) * j.L + l0) * j.D;
  a.out_head = static_cast<int64_t>(j.L) * j.D;
  a.kt = kt.get(static_cast<size_t>(j.D) * kFlashKeys);
  a.vp = vp.get(static_cast<size_t>(kFlashKeys) * a.Dp);
  a.s = sbuf.get(static_cast<size_t>(a.R) * kFlashKeys);
  a.o = obuf.get(static_cast<size_t>(a.R) * a.Dp);
  a.m = mbuf.get(a.R);
  a.l = lbuf.get(a.R);
  K.flash(a);
}

class FlashAttention : public CpuPrimitive {
 public:
  FlashAttention(mx::Stream s, float scale, bool causal) : CpuPrimitive(s), scale_(scale), causal_(causal) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const auto& q = in[0];
    const auto& k = in[1];
    const auto& v = in[2];
    auto& y = out[0];
    alloc_output(y);
    auto& enc = encoder(stream(), in, out);
    FlashJob job{q.data<float>(), k.data<float>(), v.data<float>(), y.data<float>(), {}, {}, {}, q.shape(0),
                 q.shape(1), k.shape(1), q.shape(2), k.shape(2), q.shape(3), 1, 1, causal_, scale_};
    for (int i = 0; i < 4; ++i) job.qst[i] = q.strides()[i], job.kst[i] = k.strides()[i], job.vst[i] = v.strides()[i];
    // ~64 rows per task (rep heads x nq positions) share each key block.
    const int rep = job.H / job.Hkv;
    job.nq = std::max(1, 64 / rep);
    job.nblocks = (job.L + job.nq - 1) / job.nq;
    enc.dispatch([job]() mutable {
      if (job.L == 0 || job.S == 0) return;
      Pool::get().run(job.B * job.Hkv * job.nblocks, &run_flash, &job);
    });
  }

  const char* name() const override { return "Qwen3FlashAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const FlashAttention&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_;
  }

 private:
  float scale_;
  bool causal_;
};

}  // namespace

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal,
                    mx::StreamOrDevice s) {
  require(q.ndim() == 4 && k.ndim() == 4 && v.ndim() == 4, "q, k, v must be [B, heads, length, head_dim]");
  require(k.shape() == v.shape(), "k " + shape_str(k) + " and v " + shape_str(v) + " differ");
  require(q.shape(0) == k.shape(0) && q.shape(3) == k.shape(3), "q " + shape_str(q) + " does not match k " + shape_str(k));
  const int H = q.shape(1), Hkv = k.shape(1);
  require(Hkv > 0 && H % Hkv == 0, "query heads " + std::to_string(H) + " must be a multiple of key/value heads " +
                                       std::to_string(Hkv));
  require(!causal || k.shape(2) >= q.shape(2), "causal attention needs at least as many keys as queries");
  require(q.shape(2) == 0 || k.shape(2) >= 1, "no keys");
  require(q.dtype() == mx::float32 && k.dtype() == mx::float32 && v.dtype() == mx::float32, "q, k and v must be float32");
  auto stream = mx::to_stream(s);
  return mx::array(q.shape(), mx::float32, std::make_shared<FlashAttention>(stream, scale, causal), {q, k, v});
}

mx::array decode_attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                           mx::StreamOrDevice s) {
  require(q.ndim() == 4 && k.ndim() == 4 && v.ndim() == 4, "q, k, v must be [B, heads, length, head_dim]");
  require(q.shape(2) == 1, "decode attention takes one query row per head, got " + shape_str(q));
  require(k.shape() == v.shape(), "k " + shape_str(k) + " and v " + shape_str(v) + " differ");
  require(q.shape(0) == k.shape(0) && q.shape(3) == k.shape(3), "q " + shape_str(q) + " does not match k " + shape_str(k));
  require(k.shape(2) >= 1, "no keys");
  const int H = q.shape(1), Hkv = k.shape(1);
  require(Hkv > 0 && H % Hkv == 0 && H / Hkv <= kMaxRep,
          "query heads " + std::to_string(H) + " must be a multiple (at most 16x) of key/value heads " + std::to_string(Hkv));
  require(k.dtype() == mx::float32 && v.dtype() == mx::float32, "k and v must be float32");
  auto stream = mx::to_stream(s);
  // q, k and v are taken as they are (any strides; k and v typically a slice of the cache).
  return mx::array(q.shape(), mx::float32, std::make_shared<DecodeAttention>(stream, scale),
                   {mx::astype(q, mx::float32, stream), k, v});
}

}  // namespace q3k
