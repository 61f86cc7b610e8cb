// QuantizedMatmul: dense layers with MLX-affine-quantized weights. One primitive may carry several
// weights that share their input (q/k/v, gate/up): the input is prepared once and all the products
// run in one pool region, and the graph has one node instead of several (MLX's CPU scheduling costs
// ~10-20 us a node, a good part of a decode step).
#include "common.h"
#include "driver.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace q3k {
namespace {

struct Weight {
  const uint32_t* w;
  const void *s, *b;
  float* y;
  int N;
};

class QuantizedMatmul : public mx::Primitive {
 public:
  QuantizedMatmul(mx::Stream s, int group_size, int bits, bool has_biases, int count)
      : mx::Primitive(s), gs_(group_size), bits_(bits), has_biases_(has_biases), count_(count) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const auto& x = in[0];
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (const auto& a : in) enc.set_input_array(a);
    const int per = has_biases_ ? 3 : 2;
    std::vector<Weight> ws;
    for (int i = 0; i < count_; ++i) {
      auto& y = out[i];
      y.set_data(mx::allocator::malloc(y.nbytes()));
      enc.set_output_array(y);
      const auto& w = in[1 + per * i];
      ws.push_back({w.data<uint32_t>(), in[2 + per * i].data<void>(), has_biases_ ? in[3 + per * i].data<void>() : nullptr,
                    y.data<float>(), w.shape(0)});
    }
    const int K = x.shape(-1);
    const int M = K > 0 ? static_cast<int>(x.size() / K) : 0;
    enc.dispatch([xp = x.data<float>(), xl = Layout(x), ws = std::move(ws), st = scale_type(in[2].dtype()), M, K,
                  gs = gs_, bits = bits_, biases = has_biases_]() {
      thread_local Scratch xbuf, sums, xraw;
      thread_local std::vector<MatArgs> mats;
      const Kernels& k = kernels();
      const float* xsrc = xp;
      if (!xl.contiguous) {
        float* c = xraw.get(static_cast<size_t>(M) * K);
        copy_rows(xp, xl, c);
        xsrc = c;
      }
      float* xs = biases ? sums.get(static_cast<size_t>(M) * (K / gs)) : nullptr;
      float* xq = xbuf.get(static_cast<size_t>(M) * K);
      prepare_x(k, xsrc, nullptr, M, K, gs, bits == 4, xq, xs);
      mats.clear();
      for (const Weight& w : ws) {
        MatArgs a;
        a.M = M, a.N = w.N, a.K = K, a.gs = gs;
        a.wt = bits == 4 ? WType::Q4 : WType::Q8;
        a.w = w.w, a.w_row_bytes = static_cast<int64_t>(K) * bits / 8;
        a.scales = w.s, a.biases = w.b, a.st = st;
        a.x = xq, a.ldx = K, a.xsum = xs;
        a.y = w.y, a.ldy = w.N;
        mats.push_back(a);
      }
      run_products(k, mats);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("qwen3_mlx kernels run on the CPU only");
  }
  const char* name() const override { return "Qwen3QuantizedMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const QuantizedMatmul&>(other);
    return gs_ == o.gs_ && bits_ == o.bits_ && has_biases_ == o.has_biases_ && count_ == o.count_;
  }

 private:
  int gs_, bits_;
  bool has_biases_;
  int count_;
};

}  // namespace

std::vector<mx::array> quantized_matmuls(const mx::array& x, const std::vector<mx::array>& w,
                                         const std::vector<mx::array>& scales,
                                         const std::optional<std::vector<mx::array>>& biases, int group_size,
                                         int bits, mx::StreamOrDevice s) {
  require(x.ndim() >= 1, "x must have at least one dim");
  require(!w.empty() && w.size() == scales.size() && (!biases || biases->size() == w.size()),
          "one scales (and biases) array per weight");
  const int K = x.shape(-1);
  auto stream = mx::to_stream(s);
  std::vector<mx::array> inputs = {mx::astype(x, mx::float32, stream)};
  std::vector<mx::Shape> shapes;
  for (size_t i = 0; i < w.size(); ++i) {
    std::optional<mx::array> b = biases ? std::optional<mx::array>((*biases)[i]) : std::nullopt;
    const int N = check_quantized(w[i], scales[i], b, K, group_size, bits, 0);
    require(scales[i].dtype() == scales[0].dtype(), "all scales must have one dtype");
    auto shape = x.shape();
    shape.back() = N;
    shapes.push_back(shape);
    inputs.push_back(as_input(w[i], stream));
    inputs.push_back(as_input(scales[i], stream));
    if (b) inputs.push_back(as_input(*b, stream));
  }
  auto prim = std::make_shared<QuantizedMatmul>(stream, group_size, bits, biases.has_value(), static_cast<int>(w.size()));
  auto ys = mx::array::make_arrays(std::move(shapes), std::vector<mx::Dtype>(w.size(), mx::float32), prim, inputs);
  for (auto& y : ys) y = mx::astype(y, float_out(x.dtype()), stream);
  return ys;
}

mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const std::optional<mx::array>& biases, int group_size, int bits, mx::StreamOrDevice s) {
  std::optional<std::vector<mx::array>> b;
  if (biases) b = std::vector<mx::array>{*biases};
  return quantized_matmuls(x, {w}, {scales}, b, group_size, bits, s)[0];
}

}  // namespace q3k
