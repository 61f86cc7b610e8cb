// FloatMatmul: a dense layer with float32 or bfloat16 weights (bfloat16 widened in registers).
#include <algorithm>
#include <cstring>

#include "common.h"
#include "driver.h"
#include "pool.h"

namespace q3k {
namespace {

class FloatMatmul : public CpuPrimitive {
 public:
  explicit FloatMatmul(mx::Stream s) : CpuPrimitive(s) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const auto& x = in[0];
    const auto& w = in[1];
    auto& y = out[0];
    alloc_output(y);
    auto& enc = encoder(stream(), in, out);
    const int K = x.shape(-1), N = w.shape(-2);
    const int64_t Bw = w.size() / (static_cast<int64_t>(N) * K > 0 ? static_cast<int64_t>(N) * K : 1);
    // A plain layer (w [N, K]) takes every row of x as one product; the kernel is still chosen by one
    // sequence's positions (x [..., L, K]) so a batch of sequences computes each exactly as alone.
    // Batched weights (attention's products): one product per batch.
    const int L = x.ndim() >= 2 ? x.shape(-2) : 1;
    const int M = w.ndim() == 2 && K > 0 ? static_cast<int>(x.size() / K) : L;
    const int64_t B = K > 0 && M > 0 ? static_cast<int64_t>(x.size()) / (static_cast<int64_t>(M) * K) : 0;
    // Weight rows must be contiguous (unit stride within a row); the rows themselves and the batches
    // may sit anywhere, so a slice of the KV cache (prefill attention's keys) is read in place.
    const auto& ws = w.strides();
    const int nd = static_cast<int>(w.ndim());
    const bool rows_ok = ws[nd - 1] == 1 || w.shape(-1) == 1;
    // Batch b of the weight starts at batch_off(b): its leading indices by w's strides.
    std::vector<int64_t> wshape(w.shape().begin(), w.shape().end() - 2), wstr(ws.begin(), ws.end() - 2);
    enc.dispatch([xp = x.data<float>(), xl = Layout(x), wp = w.data<uint8_t>(), bf16 = w.dtype() == mx::bfloat16,
                  isz = static_cast<int64_t>(w.itemsize()), yp = y.data<float>(), B, Bw, M, L, N, K, rows_ok,
                  row_stride = static_cast<int64_t>(nd >= 2 ? ws[nd - 2] : K), wshape, wstr, wl = Layout(w),
                  ysize = static_cast<int64_t>(y.size())]() {
      if (ysize == 0) return;
      if (K == 0 || B == 0 || Bw == 0) {  // empty sums are zero (as MLX's matmul gives)
        std::fill(yp, yp + ysize, 0.f);
        return;
      }
      thread_local Scratch xbuf;
      thread_local std::vector<MatArgs> mats;
      float* xa = xbuf.get(static_cast<size_t>(B) * M * K);
      if (xl.contiguous) {
        std::memcpy(xa, xp, sizeof(float) * B * M * K);  // aligned copy, see Scratch
      } else {
        copy_rows(xp, xl, xa);
      }
      mats.clear();
      thread_local Scratch wbuf;
      const uint8_t* wbase = wp;
      int64_t rs = row_stride;
      std::vector<int64_t> bstr = wstr;
      if (!rows_ok) {  // a transposed weight: copy it row-major (float32 only: bf16 ones come contiguous)
        float* c = wbuf.get(static_cast<size_t>(Bw) * N * K);
        copy_rows(reinterpret_cast<const float*>(wp), wl, c);
        wbase = reinterpret_cast<const uint8_t*>(c), rs = K;
        int64_t acc = static_cast<int64_t>(N) * K;
        for (int i = static_cast<int>(bstr.size()) - 1; i >= 0; --i) bstr[i] = acc, acc *= wshape[i];
      }
      const int64_t group = B / Bw;  // x batches sharing one weight batch (grouped-query attention)
      for (int64_t b = 0; b < B; ++b) {
        // Element offset of weight batch b / group from its leading indices.
        int64_t wb = b / group, off = 0;
        for (int i = static_cast<int>(wshape.size()) - 1; i >= 0; --i) {
          off += (wb % wshape[i]) * bstr[i];
          wb /= wshape[i];
        }
        MatArgs a;
        a.x = xa + b * M * K, a.ldx = K, a.M = M, a.path_rows = L;
        a.w = wbase + off * isz, a.w_row_bytes = rs * isz;
        a.wt = bf16 ? WType::BF16 : WType::F32;
        a.N = N, a.K = K;
        a.y = yp + b * M * N, a.ldy = N;
        mats.push_back(a);
      }
      run_products(kernels(), mats);
    });
  }

  const char* name() const override { return "Qwen3FloatMatmul"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

}  // namespace

mx::array matmul(const mx::array& x, const mx::array& w, mx::StreamOrDevice s) {
  Q3K_REQUIRE(x.ndim() >= 1, "x must have at least one dim");
  Q3K_REQUIRE(w.ndim() >= 2, "weight must have at least 2 dims, got " + shape_str(w));
  Q3K_REQUIRE(w.dtype() == mx::float32 || w.dtype() == mx::bfloat16, "weight must be float32 or bfloat16");
  Q3K_REQUIRE(w.shape(-1) == x.shape(-1), "weight " + shape_str(w) + " does not match x " + shape_str(x));
  if (w.ndim() > 2) {
    // Batched: x [..., M, K] and w [..., N, K] with the same leading dims, except that w's last
    // leading dim may divide x's (each weight batch then serves that many consecutive x batches).
    Q3K_REQUIRE(x.ndim() == w.ndim(), "batched x " + shape_str(x) + " and weight " + shape_str(w) + " differ in rank");
    for (int i = 0; i < static_cast<int>(x.ndim()) - 3; ++i)
      Q3K_REQUIRE(x.shape(i) == w.shape(i), "batch dims of x " + shape_str(x) + " and weight " + shape_str(w) + " differ");
    const int hx = x.shape(-3), hw = w.shape(-3);
    Q3K_REQUIRE(hw > 0 && hx % hw == 0, "weight batch " + std::to_string(hw) + " does not divide " + std::to_string(hx));
  }
  auto stream = mx::to_stream(s);
  auto shape = x.shape();
  shape.back() = w.shape(-2);
  return mx::array(shape, mx::float32, std::make_shared<FloatMatmul>(stream),
                   {mx::astype(x, mx::float32, stream), w.dtype() == mx::bfloat16 ? as_input(w, stream) : w});
}

const char* isa_name() { return kernels().name; }
int threads() { return num_threads(); }

}  // namespace q3k
