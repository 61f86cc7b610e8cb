// Python bindings (nanobind, in MLX's domain so mx.array passes through unchanged).
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "driver.h"
#include "int8.h"
#include "ops.h"

namespace nb = nanobind;
namespace mx = mlx::core;
using namespace nb::literals;

NB_MODULE(_ext, m) {
  m.doc() = "qwen3-mlx CPU kernels: matmuls, attention, norms, RoPE and MoE routing as MLX primitives";
  m.def("quantized_matmul", &q3k::quantized_matmul, "x"_a, "w"_a, "scales"_a, "biases"_a.none(), "group_size"_a,
        "bits"_a, nb::kw_only(), "stream"_a = nb::none(),
        "x [..., K] @ dequantize(w, scales, biases)^T (MLX affine layout, 4/8 bits, groups 32/64/128).");
  m.def("gather_qmm", &q3k::gather_qmm, "x"_a, "w"_a, "scales"_a, "biases"_a.none(), "indices"_a, "group_size"_a,
        "bits"_a, nb::kw_only(), "stream"_a = nb::none(),
        "Per-expert quantized matmul: out[i] = x_row(i) @ dequantize(w[indices[i]])^T -> indices.shape + [N].");
  m.def("gather_mm", &q3k::gather_mm, "x"_a, "w"_a, "indices"_a, nb::kw_only(), "stream"_a = nb::none(),
        "Per-expert float matmul: out[i] = x_row(i) @ w[indices[i]]^T for w [E, N, K] float32/bfloat16.");
  m.def("matmul", &q3k::matmul, "x"_a, "w"_a, nb::kw_only(), "stream"_a = nb::none(),
        "x [..., K] @ w^T for float32 or bfloat16 w [N, K]; float32 result.");
  m.def("decode_attention", &q3k::decode_attention, "q"_a, "k"_a, "v"_a, "scale"_a, nb::kw_only(),
        "stream"_a = nb::none(),
        "softmax(scale * q k^T) v for one query row per head (q [B, H, 1, D], k/v [B, Hkv, S, D], read in place).");
  m.def("ragged_decode_attention", &q3k::ragged_decode_attention, "q"_a, "keys"_a, "values"_a, "lengths"_a, "scale"_a,
        nb::kw_only(), "stream"_a = nb::none(),
        "Decode attention for a batch of sequences at different lengths, each in its own cache buffer "
        "(keys[b], values[b] [1, Hkv, capacity, D]; row b sees its first lengths[b] keys).");
  m.def("kv_append", &q3k::kv_append, "keys"_a, "values"_a, "kbufs"_a, "vbufs"_a, "positions"_a, nb::kw_only(),
        "stream"_a = nb::none(),
        "Write keys/values [B, Hkv, L, D] into each row's cache buffers at positions[b], in place -> "
        "[k_0, v_0, k_1, v_1, ...].");
  m.def("quantized_attention", &q3k::quantized_attention, "q"_a, "keys"_a, "values"_a, "scale"_a, "causal"_a,
        "group_size"_a, "bits"_a, nb::kw_only(), "stream"_a = nb::none(),
        "Attention on a quantized cache: keys and values each (words, scales, biases) in mx.quantize's layout.");
  m.def("attention", &q3k::attention, "q"_a, "k"_a, "v"_a, "scale"_a, "causal"_a, nb::kw_only(),
        "stream"_a = nb::none(),
        "softmax(scale * q k^T [+ causal]) v, q [B, H, L, D], k/v [B, Hkv, S, D] (read in place), no score matrix.");
  m.def("route", &q3k::route, "logits"_a, "k"_a, "norm_topk_prob"_a, nb::kw_only(), "stream"_a = nb::none(),
        "MoE routing: softmax, top-k (descending) and optional renormalisation -> [indices, probabilities].");
  m.def("gated_delta", &q3k::gated_delta, "q"_a, "k"_a, "v"_a, "g"_a, "beta"_a, "state"_a, nb::kw_only(),
        "stream"_a = nb::none(), "Gated delta rule over [B, H, L, D] inputs: (out [B, H, L, Dv], state).");
  m.def("swiglu", &q3k::swiglu, "gate"_a, "up"_a, nb::kw_only(), "stream"_a = nb::none(),
        "silu(gate) * up for float32 arrays of one shape.");
  m.def("rms_norm", &q3k::rms_norm, "x"_a, "weight"_a, "eps"_a, nb::kw_only(), "stream"_a = nb::none(),
        "x * rsqrt(mean(x^2, -1) + eps) * weight for float32 x [..., D] and a float32/bfloat16 weight [D].");
  m.def("rope", &q3k::rope, "x"_a, "inv_freq"_a, "offset"_a, "mscale"_a = 1.0f, nb::kw_only(),
        "stream"_a = nb::none(),
        "Rotary embedding (HF half-split layout) of x [B, H, L, D] at positions offset.. with inv_freq [D/2].");
  m.def("causal_conv", &q3k::causal_conv, "x"_a, "w"_a, "state"_a.none(), nb::kw_only(), "stream"_a = nb::none(),
        "Causal depthwise conv + SiLU over x [B, L, C] after state [B, K-1, C] (None: zeros) -> [y, new state].");
  m.def("quantized_embedding", &q3k::quantized_embedding, "ids"_a, "w"_a, "scales"_a, "biases"_a, "group_size"_a,
        "bits"_a, nb::kw_only(), "stream"_a = nb::none(),
        "Rows of a quantized table for token ids, dequantized as MLX does -> ids.shape + [dims] float32.");
  nb::class_<q3k::DecoderPlan>(m, "DecoderPlan",
                                "Whole decoder layers for one decoded position, the weights held: "
                                "plan(x, [k_0, v_0, ...], offset) -> [hidden, k_0, v_0, ...] (one node).")
      .def(nb::init<const mx::array&, const std::vector<mx::array>&, const std::vector<int>&, int, int, float, float,
                    float, bool>(),
           "inv_freq"_a, "arrays"_a, "projs"_a, "heads"_a, "kv_heads"_a, "eps"_a, "scale"_a, "mscale"_a, "mlp"_a)
      .def("__call__", &q3k::DecoderPlan::operator(), "x"_a, "kv"_a, "offset"_a, nb::kw_only(), "stream"_a = nb::none())
      .def_prop_ro("layers", &q3k::DecoderPlan::layers);
  m.def("read_bandwidth", &q3k::read_bandwidth_gbs, "nbytes"_a = int64_t(1) << 30, "repeats"_a = 5,
        "Memory read bandwidth (GB/s, best of `repeats`) on the kernels' threads: the decode roofline.");
  m.def("isa", &q3k::isa_name, "Instruction set the kernels run with (avx512, avx2 or generic).");
  m.def(
      "int8",
      []() -> std::optional<std::string> {
        const q3k::Int8Kernels* t = q3k::int8_kernels(q3k::gemv_max_rows() + 1);  // a prefill's
        return t ? std::optional<std::string>(t->name) : std::nullopt;
      },
      "The integer kernels quantized prefill matmuls run with (avx512-vnni, avx-vnni), or None: the float path.");
  m.def("set_int8", &q3k::set_int8, "mode"_a,
        "Integer products for quantized matmuls: 0 never, 1 prefill (the default), 2 prefill and decode; for "
        "the calls evaluated after. Returns whether this CPU has them.");
  m.def("threads", &q3k::threads, "Threads the kernels use (QWEN3_MLX_THREADS, else the usable cores).");
}
