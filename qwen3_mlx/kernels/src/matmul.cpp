// FloatMatmul: a dense layer with float32 or bfloat16 weights (bfloat16 widened in registers).
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
    const int K = x.shape(-1), N = w.shape(0);
    const int M = K > 0 ? static_cast<int>(x.size() / K) : 0;
    enc.dispatch([xp = x.data<float>(), wp = w.data<uint8_t>(), bf16 = w.dtype() == mx::bfloat16,
                  isz = static_cast<int64_t>(w.itemsize()), yp = y.data<float>(), M, N, K]() {
      thread_local Scratch xbuf;
      MatArgs a;
      float* xa = xbuf.get(static_cast<size_t>(M) * K);
      std::memcpy(xa, xp, sizeof(float) * M * K);  // aligned copy, see Scratch
      a.x = xa, a.ldx = K, a.M = M;
      a.w = wp, a.w_row_bytes = K * isz, a.wt = bf16 ? WType::BF16 : WType::F32;
      a.N = N, a.K = K;
      a.y = yp, a.ldy = N;
      if (K == 0) {
        for (int64_t i = 0; i < static_cast<int64_t>(M) * N; ++i) yp[i] = 0.f;
        return;
      }
      run_products(kernels(), {a});
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
  require(w.ndim() == 2, "weight must be 2-d, got " + shape_str(w));
  require(w.dtype() == mx::float32 || w.dtype() == mx::bfloat16, "weight must be float32 or bfloat16");
  require(w.shape(1) == x.shape(-1), "weight " + shape_str(w) + " does not match x " + shape_str(x));
  auto stream = mx::to_stream(s);
  auto shape = x.shape();
  shape.back() = w.shape(0);
  return mx::array(shape, mx::float32, std::make_shared<FloatMatmul>(stream),
                   {mx::contiguous(mx::astype(x, mx::float32, stream), false, stream), mx::contiguous(w, false, stream)});
}

const char* isa_name() { return kernels().name; }
int threads() { return num_threads(); }

}  // namespace q3k
