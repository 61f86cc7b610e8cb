// QuantizedEmbedding: the rows of an MLX-affine-quantized table for token ids, dequantized, as one node. MLX's
// CPU path gathers the words, scales and biases and dequantizes with ~50 shift, broadcast and arithmetic nodes:
// a token's embedding took more graph nodes than all 28 fused decoder layers after it.
//
// The values are MLX's own: its dequantize multiplies the codes by the scale and adds the bias as two ops in
// the scales' dtype, each rounding to it, so both roundings are made here too (and in float32 the multiply and
// add stay two operations: GCC would contract them into a fused multiply-add by default); then float32.
#include <cstring>

#include "common.h"
#include "mlx/types/half_types.h"

namespace q3k {
namespace {

template <typename T>
inline float load(const void* p, int64_t i) {
  return static_cast<float>(static_cast<const T*>(p)[i]);
}

template <typename T>
inline float round_as(float v) {
  return static_cast<float>(static_cast<T>(v));
}

template <typename T>
Q3K_NO_CONTRACT void dequantize_row(const uint32_t* w, const void* scales, const void* biases, int64_t row, int K, int gs, int bits,
                    float* out) {
  const int G = K / gs, per_word = 32 / bits;
  const uint32_t mask = (1u << bits) - 1;
  const uint32_t* words = w + row * (static_cast<int64_t>(K) / per_word);
  for (int g = 0; g < G; ++g) {
    const float s = load<T>(scales, row * G + g), b = load<T>(biases, row * G + g);
    for (int k = g * gs; k < (g + 1) * gs; ++k) {
      const float q = static_cast<float>((words[k / per_word] >> (bits * (k % per_word))) & mask);
      out[k] = round_as<T>(round_as<T>(q * s) + b);
    }
  }
}

class QuantizedEmbedding : public CpuPrimitive {
 public:
  QuantizedEmbedding(mx::Stream s, int group_size, int bits) : CpuPrimitive(s), gs_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const auto& ids = in[0];
    auto& y = out[0];
    alloc_output(y);
    auto& enc = encoder(stream(), in, out);
    const int64_t V = in[1].shape(0);
    const int K = y.shape(-1);
    // The ids are read in the task: here (the graph walk, ahead of the stream) they may not be computed yet.
    enc.dispatch([ip = ids.data<void>(), il = Layout(ids), idt = ids.dtype(), n = ids.size(), V, w = in[1].data<uint32_t>(),
                  s = in[2].data<void>(), b = in[3].data<void>(), dt = in[2].dtype(), yp = y.data<float>(), K, gs = gs_,
                  bits = bits_]() {
      thread_local std::vector<int64_t> rows;
      rows.resize(n);
      auto read = [&](auto tag) {
        using I = decltype(tag);
        thread_local std::vector<I> c;
        c.resize(n);
        if (il.contiguous) {
          std::memcpy(c.data(), ip, sizeof(I) * n);
        } else {
          copy_rows(static_cast<const I*>(ip), il, c.data());
        }
        for (size_t i = 0; i < n; ++i) {
          // Negative ids count from the end, as MLX's take does; anything outside the table gives zeros.
          const int64_t id = static_cast<int64_t>(c[i]), r = id < 0 ? id + V : id;
          rows[i] = r >= 0 && r < V ? r : -1;
        }
      };
      switch (idt) {
        case mx::int32: read(int32_t{}); break;
        case mx::uint32: read(uint32_t{}); break;
        case mx::int64: read(int64_t{}); break;
        default: read(uint64_t{}); break;  // the op function admits only these four
      }
      for (size_t i = 0; i < n; ++i) {
        float* o = yp + static_cast<int64_t>(i) * K;
        if (rows[i] < 0) {
          std::memset(o, 0, sizeof(float) * K);
        } else if (dt == mx::bfloat16) {
          dequantize_row<mx::bfloat16_t>(w, s, b, rows[i], K, gs, bits, o);
        } else if (dt == mx::float16) {
          dequantize_row<mx::float16_t>(w, s, b, rows[i], K, gs, bits, o);
        } else {
          dequantize_row<float>(w, s, b, rows[i], K, gs, bits, o);
        }
      }
    });
  }

  const char* name() const override { return "Qwen3QuantizedEmbedding"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const QuantizedEmbedding&>(other);
    return gs_ == o.gs_ && bits_ == o.bits_;
  }

 private:
  int gs_, bits_;
};

}  // namespace

mx::array quantized_embedding(const mx::array& ids, const mx::array& w, const mx::array& scales, const mx::array& biases,
                              int group_size, int bits, mx::StreamOrDevice s) {
  Q3K_REQUIRE(ids.dtype() == mx::int32 || ids.dtype() == mx::uint32 || ids.dtype() == mx::int64 ||
                  ids.dtype() == mx::uint64,
              "token ids must be int32, uint32, int64 or uint64");
  Q3K_REQUIRE(w.ndim() == 2, "quantized table must be [vocab, dims * bits / 32], got " + shape_str(w));
  Q3K_REQUIRE(bits == 4 || bits == 8, "bits must be 4 or 8, got " + std::to_string(bits));
  const int K = static_cast<int>(static_cast<int64_t>(w.shape(1)) * 32 / bits);
  check_quantized(w, scales, biases, K, group_size, bits, 0);
  auto stream = mx::to_stream(s);
  auto shape = ids.shape();
  shape.push_back(K);
  return mx::array(std::move(shape), mx::float32, std::make_shared<QuantizedEmbedding>(stream, group_size, bits),
                   {ids, as_input(w, stream), as_input(scales, stream), as_input(biases, stream)});
}

}  // namespace q3k
