// FloatMatmul: a dense layer with float32 or bfloat16 weights (bfloat16 widened in registers).
#include <algorithm>
#include <cstring>

#include "common.h"
#include "driver.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "pool.h"

namespace q3k {
namespace {

class FloatMatmul : public mx::Primitive {
 public:
  explicit FloatMatmul(mx::Stream s) : mx::Primitive(s) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const auto& x = in[0];
    const auto& w = in[1];
    auto& y = out[0];
    y.set_data(mx::allocator::malloc(y.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.set_input_array(x);
    enc.set_input_array(w);
    enc.set_output_array(y);
    const int K = x.shape(-1), N = w.shape(-2);
    const int64_t Bw = w.size() / (static_cast<int64_t>(N) * K > 0 ? static_cast<int64_t>(N) * K : 1);
    const int M = x.ndim() >= 2 ? x.shape(-2) : 1;
    const int64_t B = K > 0 && M > 0 ? static_cast<int64_t>(x.size()) / (static_cast<int64_t>(M) * K) : 0;
    enc.dispatch([xp = x.data<float>(), xl = Layout(x), wp = w.data<uint8_t>(), bf16 = w.dtype() == mx::bfloat16,
                  isz = static_cast<int64_t>(w.itemsize()), yp = y.data<float>(), B, Bw, M, N, K]() {
      if (K == 0 || B == 0) {
        std::fill(yp, yp + B * M * N, 0.f);
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
      const int64_t group = B / Bw;  // x batches sharing one weight batch (grouped-query attention)
      for (int64_t b = 0; b < B; ++b) {
        MatArgs a;
        a.x = xa + b * M * K, a.ldx = K, a.M = M;
        a.w = wp + (b / group) * N * K * isz, a.w_row_bytes = K * isz;
        a.wt = bf16 ? WType::BF16 : WType::F32;
        a.N = N, a.K = K;
        a.y = yp + b * M * N, a.ldy = N;
        mats.push_back(a);
      }
      run_products(kernels(), mats);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("qwen3_mlx kernels run on the CPU only");
  }
  const char* name() const override { return "Qwen3FloatMatmul"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

}  // namespace

mx::array matmul(const mx::array& x, const mx::array& w, mx::StreamOrDevice s) {
  require(x.ndim() >= 1, "x must have at least one dim");
  require(w.ndim() >= 2, "weight must have at least 2 dims, got " + shape_str(w));
  require(w.dtype() == mx::float32 || w.dtype() == mx::bfloat16, "weight must be float32 or bfloat16");
  require(w.shape(-1) == x.shape(-1), "weight " + shape_str(w) + " does not match x " + shape_str(x));
  if (w.ndim() > 2) {
    // Batched: x [..., M, K] and w [..., N, K] with the same leading dims, except that w's last
    // leading dim may divide x's (each weight batch then serves that many consecutive x batches).
    require(x.ndim() == w.ndim(), "batched x " + shape_str(x) + " and weight " + shape_str(w) + " differ in rank");
    for (int i = 0; i < static_cast<int>(x.ndim()) - 3; ++i)
      require(x.shape(i) == w.shape(i), "batch dims of x " + shape_str(x) + " and weight " + shape_str(w) + " differ");
    const int hx = x.shape(-3), hw = w.shape(-3);
    require(hw > 0 && hx % hw == 0, "weight batch " + std::to_string(hw) + " does not divide " + std::to_string(hx));
  }
  auto stream = mx::to_stream(s);
  auto shape = x.shape();
  shape.back() = w.shape(-2);
  return mx::array(shape, mx::float32, std::make_shared<FloatMatmul>(stream),
                   {mx::astype(x, mx::float32, stream), as_input(w, stream)});
}

const char* isa_name() { return kernels().name; }
int threads() { return num_threads(); }

}  // namespace q3k
