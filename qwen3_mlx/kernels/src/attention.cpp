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
#include "steps.h"

namespace q3k {
namespace {

constexpr int kMaxRep = 16;  // query heads per key/value head (Qwen3 goes up to 16)

// One sequence of a decode call: its keys and values (a [1 or B, Hkv, >= S, D] buffer read in place at
// its strides) and how its key range is cut.
struct Row {
  const float *k, *v;
  int64_t kst[3], vst[3];  // element strides [h, s, d]
  int S;
  // Split-K over a long cache: `splits` key ranges of `chunk` keys, whose unnormalised outputs and row
  // max / exp-sum go to the part buffer. Chosen from this row alone (its length, the kv heads, the
  // threads), never from the other rows: a sequence computes the same whatever else is batched with it.
  int splits, chunk;
  int task0;  // the row's tasks are [task0, task0 + Hkv * splits)
};

struct Job {
  const float* q;
  float* out;
  const Row* rows;
  int B, H, Hkv, D, ntasks;
  float scale;
  float* part = nullptr;  // [ntasks][rep * (D + 2)] when some row splits
};

Row make_row(const float* k, const int64_t* kst, const float* v, const int64_t* vst, int S, int Hkv, int threads) {
  Row r;
  r.k = k, r.v = v;
  for (int i = 0; i < 3; ++i) r.kst[i] = kst[i], r.vst[i] = vst[i];
  r.S = S, r.splits = 1, r.chunk = S, r.task0 = 0;
  // Fewer kv heads than twice the threads: split a long cache into key ranges of at least 512 keys, so
  // every thread streams its share of K and V once (then a small merge).
  if (Hkv < 2 * threads && S >= 1024) {
    const int want = (2 * threads + Hkv - 1) / Hkv;
    r.splits = std::max(1, std::min(want, S / 512));
    r.chunk = (S + r.splits - 1) / r.splits;
    r.splits = (S + r.chunk - 1) / r.chunk;
  }
  return r;
}

// Row b of [B, Hkv, >= S, D] arrays read at their strides.
Row make_row(const mx::array& k, const mx::array& v, int64_t b, int S, int Hkv, int threads) {
  const auto &ks = k.strides(), &vs = v.strides();
  const int64_t kst[3] = {ks[1], ks[2], ks[3]}, vst[3] = {vs[1], vs[2], vs[3]};
  return make_row(k.data<float>() + b * ks[0], kst, v.data<float>() + b * vs[0], vst, S, Hkv, threads);
}

// Rows of a strided [S, D] view as contiguous rows (only when its last axis is strided).
const float* rows(const float* p, const int64_t* st, int S, int D, Scratch& buf, int64_t* row_stride) {
  if (st[2] == 1) {
    *row_stride = st[1];
    return p;
  }
  float* c = buf.get(static_cast<size_t>(S) * D);
  copy_rows(p, Layout({S, D}, {st[1], st[2]}), c);
  *row_stride = D;
  return c;
}

void run_head(void* ctx, int t, int) {
  thread_local Scratch scores, kbuf, vbuf;
  const Job& j = *static_cast<Job*>(ctx);
  // The row owning task t (rows are in task order).
  int lo = 0, hi = j.B - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (j.rows[mid].task0 <= t) lo = mid; else hi = mid - 1;
  }
  const int b = lo;
  const Row& r = j.rows[b];
  const int local = t - r.task0, h = local / r.splits, split = local % r.splits, rep = j.H / j.Hkv;
  const int s0 = split * r.chunk, n = std::min(r.S, s0 + r.chunk) - s0;
  AttnArgs a;
  a.rep = rep, a.S = n, a.D = j.D, a.scale = j.scale;
  a.q = j.q + (static_cast<int64_t>(b) * j.H + static_cast<int64_t>(h) * rep) * j.D;
  a.k = rows(r.k + h * r.kst[0] + s0 * r.kst[1], r.kst, n, j.D, kbuf, &a.ks);
  a.v = rows(r.v + h * r.vst[0] + s0 * r.vst[1], r.vst, n, j.D, vbuf, &a.vs);
  a.scores = scores.get(static_cast<size_t>(rep) * n);
  if (r.splits == 1) {
    a.out = j.out + (static_cast<int64_t>(b) * j.H + static_cast<int64_t>(h) * rep) * j.D;
  } else {
    float* p = j.part + static_cast<int64_t>(t) * rep * (j.D + 2);
    a.out = p, a.row_max = p + rep * j.D, a.row_sum = a.row_max + rep;
  }
  kernels().attend(a);
}

// The decode tasks: on the pool, or on the caller when the keys and values they read are few (a short cache of
// a small model: less time than waking and joining another thread). The same tasks either way.
void run_heads(Job& j) {
  int64_t bytes = 0;
  for (int b = 0; b < j.B; ++b) bytes += static_cast<int64_t>(j.rows[b].S) * j.Hkv * j.D * 2 * sizeof(float);
  if (bytes < (int64_t(32) << 10)) {
    for (int t = 0; t < j.ntasks; ++t) run_head(&j, t, 0);
  } else {
    Pool::get().run(j.ntasks, &run_head, &j);
  }
}

// Merges the key ranges of each split (b, kv head): out = sum_i o_i e^(m_i - M) / sum_i l_i e^(m_i - M).
void merge_splits(const Job& j) {
  const int rep = j.H / j.Hkv;
  const int64_t stride = static_cast<int64_t>(rep) * (j.D + 2);
  for (int b = 0; b < j.B; ++b) {
    const Row& row = j.rows[b];
    if (row.splits == 1) continue;
    for (int h = 0; h < j.Hkv; ++h) {
      const float* base = j.part + static_cast<int64_t>(row.task0 + h * row.splits) * stride;
      float* out = j.out + (static_cast<int64_t>(b) * j.H + static_cast<int64_t>(h) * rep) * j.D;
      for (int r = 0; r < rep; ++r) {
        float M = -INFINITY;
        for (int i = 0; i < row.splits; ++i) M = std::max(M, base[i * stride + rep * j.D + r]);
        float denom = 0.f;
        float* o = out + static_cast<int64_t>(r) * j.D;
        for (int d = 0; d < j.D; ++d) o[d] = 0.f;
        for (int i = 0; i < row.splits; ++i) {
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
}

// Inputs: q [B, H, 1, D], then either k and v [B, Hkv, S, D] (every row sees all S keys) or, for a
// batch of sequences at different lengths, one k and one v [1, Hkv, >= lengths[b], D] per row b (each
// sequence's own cache buffer; row b sees its first lengths[b] keys).
class DecodeAttention : public CpuPrimitive {
 public:
  DecodeAttention(mx::Stream s, float scale, std::vector<int> lengths)
      : CpuPrimitive(s), scale_(scale), lengths_(std::move(lengths)) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const auto& q = in[0];
    auto& y = out[0];
    alloc_output(y);
    auto& enc = encoder(stream(), in, out);
    const int B = q.shape(0), Hkv = in[1].shape(1), threads = Pool::get().size();
    const bool ragged = !lengths_.empty();  // (a batch of one has as many inputs as the plain form)
    std::vector<Row> rows;
    rows.reserve(B);
    int ntasks = 0;
    bool split = false;
    for (int b = 0; b < B; ++b) {
      const auto& k = in[ragged ? 1 + 2 * b : 1];
      const auto& v = in[ragged ? 2 + 2 * b : 2];
      Row r = make_row(k, v, ragged ? 0 : b, ragged ? lengths_[b] : k.shape(2), Hkv, threads);
      r.task0 = ntasks;
      ntasks += Hkv * r.splits;
      split |= r.splits > 1;
      rows.push_back(r);
    }
    Job job{q.data<float>(), y.data<float>(), nullptr, B, q.shape(1), Hkv, q.shape(3), ntasks, scale_};
    enc.dispatch([job, split, rows = std::move(rows), ql = Layout(q)]() mutable {
      thread_local Scratch qbuf, parts;
      if (!ql.contiguous) {
        float* c = qbuf.get(static_cast<size_t>(job.B) * job.H * job.D);
        copy_rows(job.q, ql, c);
        job.q = c;
      }
      job.rows = rows.data();
      if (split) job.part = parts.get(static_cast<size_t>(job.ntasks) * (job.H / job.Hkv) * (job.D + 2));
      run_heads(job);
      if (split) merge_splits(job);
    });
  }

  const char* name() const override { return "Qwen3DecodeAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const DecodeAttention&>(other);
    return scale_ == o.scale_ && lengths_ == o.lengths_;
  }

 private:
  float scale_;
  std::vector<int> lengths_;
};

}  // namespace

void decode_attention_heads(const float* q, int H, int D, const float* k, const int64_t* kst, const float* v,
                            const int64_t* vst, int Hkv, int S, float scale, float* out) {
  thread_local Scratch parts;
  const Row row = make_row(k, kst, v, vst, S, Hkv, Pool::get().size());
  Job job{q, out, &row, 1, H, Hkv, D, Hkv * row.splits, scale};
  if (row.splits > 1) job.part = parts.get(static_cast<size_t>(job.ntasks) * (H / Hkv) * (D + 2));
  run_heads(job);
  if (row.splits > 1) merge_splits(job);
}

namespace {

// ---- prefill ----

// A quantized cache: keys and values as MLX affine rows of D values (uint32 words [B, Hkv, S, D * bits / 32],
// float32 scales and biases [B, Hkv, S, D / gs]), read in place at their strides.
struct QuantCache {
  const uint32_t *kq, *vq;
  const float *ks, *kb, *vs, *vb;
  int64_t kqst[3], ksst[3], vqst[3], vsst[3];  // element strides [b, h, s]
  int bits, gs;

  // Head (b, h)'s key (value) rows as a weight the kernels' `expand` takes.
  MatArgs rows(int b, int h, int D, int S, bool values) const {
    const uint32_t* q = values ? vq : kq;
    const float *sc = values ? vs : ks, *bi = values ? vb : kb;
    const int64_t* qst = values ? vqst : kqst;
    const int64_t* sst = values ? vsst : ksst;
    MatArgs m;
    m.w = q + b * qst[0] + h * qst[1], m.w_row_bytes = qst[2] * 4;
    m.wt = bits == 4 ? WType::Q4 : WType::Q8;
    m.scales = sc + b * sst[0] + h * sst[1], m.biases = bi + b * sst[0] + h * sst[1], m.st = SType::F32;
    m.gs = gs, m.K = D, m.N = S;
    return m;
  }
};

struct FlashJob {
  const float *q, *k, *v;
  float* out;
  int64_t qst[4], kst[4], vst[4];  // element strides [b, h, l, d]
  int B, H, Hkv, L, S, D;
  int nq;       // query positions per task
  int nblocks;  // query blocks per (b, kv head)
  bool causal;
  float scale;
  const struct QuantCache* quant = nullptr;  // a quantized cache instead of k, v
};

void run_flash(void* ctx, int t, int) {
  thread_local Scratch qbuf, kt, vp, sbuf, obuf, mbuf, lbuf, stage;
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
  MatArgs km, vm;
  if (j.quant) {
    km = j.quant->rows(b, hkv, j.D, j.S, false), vm = j.quant->rows(b, hkv, j.D, j.S, true);
    a.kq = &km, a.vq = &vm, a.stage = stage.get(static_cast<size_t>(kFlashKeys) * j.D);
  } else {
    a.k = j.k + b * j.kst[0] + hkv * j.kst[1], a.ks = j.kst[2], a.kd = j.kst[3];
    a.v = j.v + b * j.vst[0] + hkv * j.vst[1], a.vs = j.vst[2], a.vd = j.vst[3];
  }
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


// ---- a quantized cache ----

struct QDecodeJob {
  const float* q;
  float* out;
  const QuantCache* c;
  int B, H, Hkv, S, D, splits, chunk;
  float scale;
  float* part;  // [B * Hkv * splits][rep * (D + 2)] when splits > 1
};

// One (b, kv head, key range): blocks of kFlashKeys keys and values expanded from the quantized rows, each
// block attended with the float kernel (unnormalised) and merged with an online softmax.
void run_qhead(void* ctx, int t, int) {
  thread_local Scratch qp, kst, vst, acc, bo, bs, scores;
  const QDecodeJob& j = *static_cast<QDecodeJob*>(ctx);
  const Kernels& K = kernels();
  const int split = t % j.splits, bh = t / j.splits, b = bh / j.Hkv, h = bh % j.Hkv, rep = j.H / j.Hkv, D = j.D;
  const int s0 = split * j.chunk, s1 = std::min(j.S, s0 + j.chunk);
  const MatArgs km = j.c->rows(b, h, D, j.S, false), vm = j.c->rows(b, h, D, j.S, true);
  const bool k4 = km.wt == WType::Q4, v4 = vm.wt == WType::Q4;
  // The query rows in the expanded keys' lane order: a dot product does not change when both sides are
  // permuted alike. The values' order is undone at the end.
  float* q = qp.get(static_cast<size_t>(rep) * D);
  const float* qsrc = j.q + (static_cast<int64_t>(b) * j.H + static_cast<int64_t>(h) * rep) * D;
  for (int r = 0; r < rep; ++r)
    for (int d = 0; d < D; ++d) q[r * D + expanded_pos(d, k4, K.lanes)] = qsrc[r * D + d];
  float* o = acc.get(static_cast<size_t>(rep) * D);
  float* blk = bo.get(static_cast<size_t>(rep) * D);
  float* stats = bs.get(static_cast<size_t>(4) * rep);  // block max, block sum, running max, running sum
  float *bmax = stats, *bsum = stats + rep, *m = stats + 2 * rep, *l = stats + 3 * rep;
  for (int r = 0; r < rep; ++r) m[r] = -INFINITY, l[r] = 0.f;
  std::fill(o, o + static_cast<int64_t>(rep) * D, 0.f);
  float* kb = kst.get(static_cast<size_t>(kFlashKeys) * D);
  float* vb = vst.get(static_cast<size_t>(kFlashKeys) * D);
  for (int c0 = s0; c0 < s1; c0 += kFlashKeys) {
    const int bk = std::min(kFlashKeys, s1 - c0);
    K.expand(km, c0, c0 + bk, kb);
    K.expand(vm, c0, c0 + bk, vb);
    AttnArgs a;
    a.q = q, a.k = kb, a.v = vb, a.ks = D, a.vs = D, a.rep = rep, a.S = bk, a.D = D, a.scale = j.scale;
    a.out = blk, a.scores = scores.get(static_cast<size_t>(rep) * kFlashKeys), a.row_max = bmax, a.row_sum = bsum;
    K.attend(a);
    for (int r = 0; r < rep; ++r) {
      const float M = std::max(m[r], bmax[r]);
      const float wo = std::exp(m[r] - M), wb = std::exp(bmax[r] - M);  // wo = 0 on the first block
      float* orow = o + static_cast<int64_t>(r) * D;
      const float* brow = blk + static_cast<int64_t>(r) * D;
      for (int d = 0; d < D; ++d) orow[d] = orow[d] * wo + brow[d] * wb;
      l[r] = l[r] * wo + bsum[r] * wb;
      m[r] = M;
    }
  }
  for (int r = 0; r < rep; ++r) {
    float* dst;
    float inv = 1.f;
    if (j.splits == 1) {
      dst = j.out + (static_cast<int64_t>(b) * j.H + static_cast<int64_t>(h) * rep + r) * D;
      inv = 1.f / l[r];
    } else {
      float* p = j.part + static_cast<int64_t>(t) * rep * (D + 2);
      dst = p + static_cast<int64_t>(r) * D;
      p[rep * D + r] = m[r], p[rep * D + rep + r] = l[r];
    }
    for (int d = 0; d < D; ++d) dst[d] = o[static_cast<int64_t>(r) * D + expanded_pos(d, v4, K.lanes)] * inv;
  }
}

void merge_qsplits(const QDecodeJob& j) {
  const int rep = j.H / j.Hkv;
  const int64_t stride = static_cast<int64_t>(rep) * (j.D + 2);
  for (int bh = 0; bh < j.B * j.Hkv; ++bh) {
    const float* base = j.part + static_cast<int64_t>(bh) * j.splits * stride;
    for (int r = 0; r < rep; ++r) {
      float M = -INFINITY, denom = 0.f;
      for (int i = 0; i < j.splits; ++i) M = std::max(M, base[i * stride + rep * j.D + r]);
      float* o = j.out + (static_cast<int64_t>(bh) * rep + r) * j.D;
      std::fill(o, o + j.D, 0.f);
      for (int i = 0; i < j.splits; ++i) {
        const float* p = base + i * stride;
        const float w = std::exp(p[rep * j.D + r] - M);
        denom += w * p[rep * j.D + rep + r];
        for (int d = 0; d < j.D; ++d) o[d] += w * p[static_cast<int64_t>(r) * j.D + d];
      }
      for (int d = 0; d < j.D; ++d) o[d] /= denom;
    }
  }
}

// Inputs: q [B, H, L, D] float32, then the keys' words, scales, biases and the values' (QuantCache). One
// query row: decode tasks over (b, kv head, key range); more: the flash kernel expanding each key block.
class QuantizedAttention : public CpuPrimitive {
 public:
  QuantizedAttention(mx::Stream s, float scale, bool causal, int bits, int gs)
      : CpuPrimitive(s), scale_(scale), causal_(causal), bits_(bits), gs_(gs) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const auto& q = in[0];
    auto& y = out[0];
    alloc_output(y);
    auto& enc = encoder(stream(), in, out);
    QuantCache c;
    c.kq = in[1].data<uint32_t>(), c.ks = in[2].data<float>(), c.kb = in[3].data<float>();
    c.vq = in[4].data<uint32_t>(), c.vs = in[5].data<float>(), c.vb = in[6].data<float>();
    for (int i = 0; i < 3; ++i) {
      c.kqst[i] = in[1].strides()[i], c.ksst[i] = in[2].strides()[i];
      c.vqst[i] = in[4].strides()[i], c.vsst[i] = in[5].strides()[i];
    }
    c.bits = bits_, c.gs = gs_;
    for (int i = 1; i < 7; ++i) {
      // Rows may sit anywhere (a slice of a larger buffer), but each row's words and scales are contiguous.
      const auto& a = in[i];
      Q3K_REQUIRE(a.strides()[3] == 1 && (a.shape(2) <= 1 || a.strides()[2] == a.shape(3)),
              "quantized cache rows must be contiguous (a slice of a [B, H, capacity, n] buffer along capacity)");
    }
    const int B = q.shape(0), H = q.shape(1), L = q.shape(2), D = q.shape(3), Hkv = in[1].shape(1), S = in[1].shape(2);
    enc.dispatch([c, B, H, L, D, Hkv, S, ql = Layout(q), qp = q.data<float>(), yp = y.data<float>(),
                  qst = q.strides(), scale = scale_, causal = causal_]() mutable {
      if (L == 0 || S == 0) return;
      if (L == 1) {
        thread_local Scratch qbuf, parts;
        const float* qc = qp;
        if (!ql.contiguous) {
          float* cp = qbuf.get(static_cast<size_t>(B) * H * D);
          copy_rows(qp, ql, cp);
          qc = cp;
        }
        const int threads = Pool::get().size();
        QDecodeJob j{qc, yp, &c, B, H, Hkv, S, D, 1, S, scale, nullptr};
        if (B * Hkv < 2 * threads && S >= 1024) {  // as the float kernel: split long caches
          const int want = (2 * threads + B * Hkv - 1) / (B * Hkv);
          j.splits = std::max(1, std::min(want, S / 512));
          j.chunk = (S + j.splits - 1) / j.splits;
          j.splits = (S + j.chunk - 1) / j.chunk;
        }
        if (j.splits > 1) j.part = parts.get(static_cast<size_t>(B) * H * j.splits * (D + 2));
        Pool::get().run(B * Hkv * j.splits, &run_qhead, &j);
        if (j.splits > 1) merge_qsplits(j);
        return;
      }
      FlashJob job{qp, nullptr, nullptr, yp, {}, {}, {}, B, H, Hkv, L, S, D, 1, 1, causal, scale, &c};
      for (int i = 0; i < 4; ++i) job.qst[i] = qst[i];
      job.nq = std::max(1, 64 / (H / Hkv));
      job.nblocks = (L + job.nq - 1) / job.nq;
      Pool::get().run(B * Hkv * job.nblocks, &run_flash, &job);
    });
  }

  const char* name() const override { return "Qwen3QuantizedAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const QuantizedAttention&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_ && bits_ == o.bits_ && gs_ == o.gs_;
  }

 private:
  float scale_;
  bool causal_;
  int bits_, gs_;
};

}  // namespace

mx::array quantized_attention(const mx::array& q, const std::vector<mx::array>& keys,
                              const std::vector<mx::array>& values, float scale, bool causal, int group_size, int bits,
                              mx::StreamOrDevice s) {
  Q3K_REQUIRE(q.ndim() == 4 && q.dtype() == mx::float32, "q must be float32 [B, heads, length, head_dim], got " + shape_str(q));
  Q3K_REQUIRE(keys.size() == 3 && values.size() == 3, "keys and values must each be (words, scales, biases)");
  Q3K_REQUIRE(bits == 4 || bits == 8, "bits must be 4 or 8, got " + std::to_string(bits));
  Q3K_REQUIRE(group_size == 32 || group_size == 64 || group_size == 128, "group_size must be 32, 64 or 128");
  const int B = q.shape(0), H = q.shape(1), D = q.shape(3);
  Q3K_REQUIRE(D % group_size == 0, "head_dim " + std::to_string(D) + " is not a multiple of the group size");
  const auto& k0 = keys[0];
  Q3K_REQUIRE(k0.ndim() == 4 && k0.shape(0) == B, "quantized keys must be [B, kv_heads, S, words], got " + shape_str(k0));
  const int Hkv = k0.shape(1), S = k0.shape(2);
  Q3K_REQUIRE(Hkv > 0 && H % Hkv == 0 && H / Hkv <= kMaxRep, "query heads must be a multiple (at most 16x) of kv heads");
  Q3K_REQUIRE(!causal || S >= q.shape(2), "causal attention needs at least as many keys as queries");
  for (const auto* part : {&keys, &values}) {
    const auto &w = (*part)[0], &sc = (*part)[1], &bi = (*part)[2];
    Q3K_REQUIRE(w.dtype() == mx::uint32 && w.shape() == mx::Shape({B, Hkv, S, D * bits / 32}),
            "quantized words must be uint32 [B, kv_heads, S, head_dim * bits / 32], got " + shape_str(w));
    Q3K_REQUIRE(sc.dtype() == mx::float32 && bi.dtype() == mx::float32 &&
                sc.shape() == mx::Shape({B, Hkv, S, D / group_size}) && bi.shape() == sc.shape(),
            "scales and biases must be float32 [B, kv_heads, S, head_dim / group_size], got " + shape_str(sc));
  }
  auto stream = mx::to_stream(s);
  // Taken as they are: a cache buffer sliced along its positions (checked when evaluated).
  std::vector<mx::array> inputs = {q, keys[0], keys[1], keys[2], values[0], values[1], values[2]};
  return mx::array(q.shape(), mx::float32,
                   std::make_shared<QuantizedAttention>(stream, scale, causal, bits, group_size), std::move(inputs));
}

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal,
                    mx::StreamOrDevice s) {
  Q3K_REQUIRE(q.ndim() == 4 && k.ndim() == 4 && v.ndim() == 4, "q, k, v must be [B, heads, length, head_dim]");
  Q3K_REQUIRE(k.shape() == v.shape(), "k " + shape_str(k) + " and v " + shape_str(v) + " differ");
  Q3K_REQUIRE(q.shape(0) == k.shape(0) && q.shape(3) == k.shape(3), "q " + shape_str(q) + " does not match k " + shape_str(k));
  const int H = q.shape(1), Hkv = k.shape(1);
  Q3K_REQUIRE(Hkv > 0 && H % Hkv == 0, "query heads " + std::to_string(H) + " must be a multiple of key/value heads " +
                                       std::to_string(Hkv));
  Q3K_REQUIRE(!causal || k.shape(2) >= q.shape(2), "causal attention needs at least as many keys as queries");
  Q3K_REQUIRE(q.shape(2) == 0 || k.shape(2) >= 1, "no keys");
  Q3K_REQUIRE(q.dtype() == mx::float32 && k.dtype() == mx::float32 && v.dtype() == mx::float32, "q, k and v must be float32");
  auto stream = mx::to_stream(s);
  return mx::array(q.shape(), mx::float32, std::make_shared<FlashAttention>(stream, scale, causal), {q, k, v});
}

mx::array decode_attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                           mx::StreamOrDevice s) {
  Q3K_REQUIRE(q.ndim() == 4 && k.ndim() == 4 && v.ndim() == 4, "q, k, v must be [B, heads, length, head_dim]");
  Q3K_REQUIRE(q.shape(2) == 1, "decode attention takes one query row per head, got " + shape_str(q));
  Q3K_REQUIRE(k.shape() == v.shape(), "k " + shape_str(k) + " and v " + shape_str(v) + " differ");
  Q3K_REQUIRE(q.shape(0) == k.shape(0) && q.shape(3) == k.shape(3), "q " + shape_str(q) + " does not match k " + shape_str(k));
  Q3K_REQUIRE(k.shape(2) >= 1, "no keys");
  const int H = q.shape(1), Hkv = k.shape(1);
  Q3K_REQUIRE(Hkv > 0 && H % Hkv == 0 && H / Hkv <= kMaxRep,
          "query heads " + std::to_string(H) + " must be a multiple (at most 16x) of key/value heads " + std::to_string(Hkv));
  Q3K_REQUIRE(k.dtype() == mx::float32 && v.dtype() == mx::float32, "k and v must be float32");
  auto stream = mx::to_stream(s);
  // q, k and v are taken as they are (any strides; k and v typically a slice of the cache).
  return mx::array(q.shape(), mx::float32, std::make_shared<DecodeAttention>(stream, scale, std::vector<int>{}),
                   {mx::astype(q, mx::float32, stream), k, v});
}

mx::array ragged_decode_attention(const mx::array& q, const std::vector<mx::array>& keys,
                                  const std::vector<mx::array>& values, const std::vector<int>& lengths, float scale,
                                  mx::StreamOrDevice s) {
  Q3K_REQUIRE(q.ndim() == 4 && q.shape(2) == 1, "q must be [B, heads, 1, head_dim], got " + shape_str(q));
  const int B = q.shape(0), H = q.shape(1), D = q.shape(3);
  Q3K_REQUIRE(static_cast<int>(keys.size()) == B && static_cast<int>(values.size()) == B &&
              static_cast<int>(lengths.size()) == B,
          "ragged attention needs one key buffer, value buffer and length per batch row (" + std::to_string(B) + ")");
  Q3K_REQUIRE(B >= 1, "empty batch");
  const int Hkv = keys[0].ndim() == 4 ? keys[0].shape(1) : 0;
  Q3K_REQUIRE(Hkv > 0 && H % Hkv == 0 && H / Hkv <= kMaxRep,
          "query heads " + std::to_string(H) + " must be a multiple (at most 16x) of key/value heads");
  auto stream = mx::to_stream(s);
  std::vector<mx::array> inputs = {mx::astype(q, mx::float32, stream)};
  for (int b = 0; b < B; ++b) {
    const auto &k = keys[b], &v = values[b];
    Q3K_REQUIRE(k.ndim() == 4 && k.shape(0) == 1 && k.shape(1) == Hkv && k.shape(3) == D && v.shape() == k.shape(),
            "row " + std::to_string(b) + ": key and value buffers must both be [1, " + std::to_string(Hkv) +
                ", S, " + std::to_string(D) + "], got " + shape_str(k) + " and " + shape_str(v));
    Q3K_REQUIRE(k.dtype() == mx::float32 && v.dtype() == mx::float32, "k and v must be float32");
    Q3K_REQUIRE(lengths[b] >= 1 && lengths[b] <= k.shape(2),
            "row " + std::to_string(b) + ": length " + std::to_string(lengths[b]) + " outside the buffer's 1.." +
                std::to_string(k.shape(2)));
    inputs.push_back(k);
    inputs.push_back(v);
  }
  return mx::array(q.shape(), mx::float32, std::make_shared<DecodeAttention>(stream, scale, lengths), std::move(inputs));
}

}  // namespace q3k
