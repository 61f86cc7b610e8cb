// QuantizedMatmul: a dense layer with MLX-affine-quantized weights.
#include "common.h"
#include "driver.h"
#include "int8.h"

namespace q3k {
namespace {

class QuantizedMatmul : public CpuPrimitive {
 public:
  QuantizedMatmul(mx::Stream s, int group_size, int bits, bool has_biases)
      : CpuPrimitive(s), gs_(group_size), bits_(bits), has_biases_(has_biases) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const auto& x = in[0];
    const auto& w = in[1];
    const auto& scales = in[2];
    auto& y = out[0];
    alloc_output(y);
    auto& enc = encoder(stream(), in, out);
    const int K = x.shape(-1), N = w.shape(0);
    const int M = K > 0 ? static_cast<int>(x.size() / K) : 0;
    const int path_rows = x.ndim() >= 2 ? x.shape(-2) : 1;  // x [..., L, K]: positions of one sequence
    enc.dispatch([xp = x.data<float>(), xl = Layout(x), wp = w.data<uint32_t>(), sp = scales.data<void>(),
                  bp = has_biases_ ? in[3].data<void>() : nullptr, yp = y.data<float>(), st = scale_type(scales.dtype()),
                  M, N, K, path_rows, gs = gs_, bits = bits_]() {
      thread_local Scratch xraw;
      thread_local QuantizedActivations acts;
      const float* xsrc = xp;
      if (!xl.contiguous) {
        float* c = xraw.get(static_cast<size_t>(M) * K);
        copy_rows(xp, xl, c);
        xsrc = c;
      }
      acts.prepare(xsrc, nullptr, M, K, gs, bits, bp != nullptr, path_rows);
      MatArgs a;
      a.M = M, a.path_rows = path_rows, a.N = N, a.K = K, a.gs = gs;
      a.wt = bits == 4 ? WType::Q4 : WType::Q8;
      a.w = wp, a.w_row_bytes = static_cast<int64_t>(K) * bits / 8;
      a.scales = sp, a.biases = bp, a.st = st;
      a.y = yp, a.ldy = N;
      acts.into(a, 0);
      run_products(kernels(), {a});
    });
  }

  const char* name() const override { return "Qwen3QuantizedMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const QuantizedMatmul&>(other);
    return gs_ == o.gs_ && bits_ == o.bits_ && has_biases_ == o.has_biases_;
  }

 private:
  int gs_, bits_;
  bool has_biases_;
};

}  // namespace

mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const std::optional<mx::array>& biases, int group_size, int bits, mx::StreamOrDevice s) {
  Q3K_REQUIRE(x.ndim() >= 1, "x must have at least one dim");
  const int K = x.shape(-1);
  const int N = check_quantized(w, scales, biases, K, group_size, bits, 0);
  auto stream = mx::to_stream(s);
  auto shape = x.shape();
  shape.back() = N;
  std::vector<mx::array> inputs = {mx::astype(x, mx::float32, stream),
                                   as_input(w, stream), as_input(scales, stream)};
  if (biases) inputs.push_back(as_input(*biases, stream));
  auto y = mx::array(shape, mx::float32, std::make_shared<QuantizedMatmul>(stream, group_size, bits, biases.has_value()),
                     std::move(inputs));
  return mx::astype(y, float_out(mx::promote_types(x.dtype(), scales.dtype())), stream);
}

}  // namespace q3k
