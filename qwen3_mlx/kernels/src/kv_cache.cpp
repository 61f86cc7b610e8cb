// KVAppend: one step's keys and values for a batch of sequences, each written into that sequence's own
// cache buffer at its own position. MLX's slice update would be one graph node per row and tensor (~900
// per decoded token for 16 sequences of a 28-layer model); this is one per layer.
#include <cstring>

#include "common.h"

namespace q3k {
namespace {

struct Source {
  const float* p;
  int64_t st[4];  // element strides [b, h, l, d]
};

class KVAppend : public CpuPrimitive {
 public:
  KVAppend(mx::Stream s, std::vector<int> positions) : CpuPrimitive(s), positions_(std::move(positions)) {}

  // in: keys, values [B, Hkv, L, D] (any strides), then the buffers k_0, v_0, ..., k_{B-1}, v_{B-1}
  // [1, Hkv, capacity, D]; out: the buffers with rows positions[b] .. positions[b] + L - 1 written.
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const int B = in[0].shape(0), Hkv = in[0].shape(1), L = in[0].shape(2), D = in[0].shape(3);
    std::vector<std::pair<const float*, float*>> copies;  // buffers that could not be shared (strided)
    for (size_t i = 0; i < out.size(); ++i) {
      const auto& buf = in[2 + i];
      if (buf.flags().row_contiguous) {
        // Written in place: the cache's contract is that nobody reads a buffer past its sequence's length,
        // which is where the new rows go, so the old array (still referenced by the previous step's
        // graph) sees no change in what it holds.
        out[i].copy_shared_buffer(buf);
      } else {
        out[i].set_data(mx::allocator::malloc(out[i].nbytes()));
        copies.push_back({buf.data<float>(), out[i].data<float>()});
      }
    }
    auto& enc = encoder(stream(), in, out);
    std::vector<float*> dst(out.size());
    for (size_t i = 0; i < out.size(); ++i) dst[i] = out[i].data<float>();
    std::vector<Layout> strided;
    for (size_t i = 0; i < out.size(); ++i)
      if (!in[2 + i].flags().row_contiguous) strided.emplace_back(in[2 + i]);
    Source k{in[0].data<float>(), {}}, v{in[1].data<float>(), {}};
    for (int i = 0; i < 4; ++i) k.st[i] = in[0].strides()[i], v.st[i] = in[1].strides()[i];
    std::vector<int64_t> caps(out.size());  // each buffer's capacity (rows per head)
    for (size_t i = 0; i < out.size(); ++i) caps[i] = in[2 + i].shape(2);
    enc.dispatch([k, v, B, Hkv, L, D, dst = std::move(dst), caps = std::move(caps), pos = positions_,
                  copies = std::move(copies), strided = std::move(strided)]() {
      for (size_t i = 0; i < copies.size(); ++i) copy_rows(copies[i].first, strided[i], copies[i].second);
      for (int b = 0; b < B; ++b)
        for (int t = 0; t < 2; ++t) {
          const Source& src = t == 0 ? k : v;
          float* base = dst[2 * b + t];
          for (int h = 0; h < Hkv; ++h)
            for (int l = 0; l < L; ++l) {
              const float* s = src.p + b * src.st[0] + h * src.st[1] + l * src.st[2];
              float* d = base + (static_cast<int64_t>(h) * caps[2 * b + t] + pos[b] + l) * D;
              if (src.st[3] == 1) {
                std::memcpy(d, s, sizeof(float) * D);
              } else {
                for (int e = 0; e < D; ++e) d[e] = s[e * src.st[3]];
              }
            }
        }
    });
  }

  const char* name() const override { return "Qwen3KVAppend"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return positions_ == static_cast<const KVAppend&>(other).positions_;
  }

 private:
  std::vector<int> positions_;
};

}  // namespace

std::vector<mx::array> kv_append(const mx::array& keys, const mx::array& values, const std::vector<mx::array>& kbufs,
                                 const std::vector<mx::array>& vbufs, const std::vector<int>& positions,
                                 mx::StreamOrDevice s) {
  Q3K_REQUIRE(keys.ndim() == 4 && keys.shape() == values.shape(),
          "keys and values must both be [B, kv_heads, L, head_dim], got " + shape_str(keys) + " and " + shape_str(values));
  Q3K_REQUIRE(keys.dtype() == mx::float32 && values.dtype() == mx::float32, "keys and values must be float32");
  const int B = keys.shape(0), Hkv = keys.shape(1), L = keys.shape(2), D = keys.shape(3);
  Q3K_REQUIRE(static_cast<int>(kbufs.size()) == B && static_cast<int>(vbufs.size()) == B &&
              static_cast<int>(positions.size()) == B,
          "kv_append needs one key buffer, value buffer and position per batch row (" + std::to_string(B) + ")");
  std::vector<mx::array> inputs = {keys, values};
  std::vector<mx::Shape> shapes;
  for (int b = 0; b < B; ++b) {
    for (const auto* buf : {&kbufs[b], &vbufs[b]}) {
      Q3K_REQUIRE(buf->ndim() == 4 && buf->shape(0) == 1 && buf->shape(1) == Hkv && buf->shape(3) == D &&
                  buf->dtype() == mx::float32,
              "row " + std::to_string(b) + ": cache buffers must be float32 [1, " + std::to_string(Hkv) + ", capacity, " +
                  std::to_string(D) + "], got " + shape_str(*buf));
      Q3K_REQUIRE(positions[b] >= 0 && static_cast<int64_t>(positions[b]) + L <= buf->shape(2),
              "row " + std::to_string(b) + ": positions " + std::to_string(positions[b]) + ".." +
                  std::to_string(positions[b] + L - 1) + " do not fit a buffer of " + std::to_string(buf->shape(2)));
      inputs.push_back(*buf);
      shapes.push_back(buf->shape());
    }
  }
  auto stream = mx::to_stream(s);
  return mx::array::make_arrays(std::move(shapes), std::vector<mx::Dtype>(2 * B, mx::float32),
                                std::make_shared<KVAppend>(stream, positions), inputs);
}

}  // namespace q3k
