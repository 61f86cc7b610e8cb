// The operations the extension adds to MLX. Each is one Primitive (eval_cpu only: the Python side
// routes GPU streams to MLX's own kernels), defined in the .cpp of the same name except: the four
// attentions in attention.cpp, gather_mm in gather_qmm.cpp, kv_append in kv_cache.cpp, decoder_layers in decoder_layers.cpp, quantized_embedding in embedding.cpp, causal_conv in conv.cpp, route in
// router.cpp, rms_norm in norm.cpp; read_bandwidth_gbs is in bandwidth.cpp, isa_name and threads
// in matmul.cpp.
#pragma once

#include <memory>
#include <optional>
#include <variant>
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace q3k {

namespace mx = mlx::core;

// x [..., K] @ dequantize(w [N, K * bits / 32], scales, biases [N, K / group_size])^T -> [..., N],
// MLX's affine layout; bits 4 or 8, group_size 32, 64 or 128. Result in x's dtype.
mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const std::optional<mx::array>& biases, int group_size, int bits,
                           mx::StreamOrDevice s = {});

// Mixture-of-experts: for each index i of `indices` (expert ids into w [E, N, K * bits / 32]),
// out[i] = x_row(i) @ dequantize(w[indices[i]])^T, where x [..., K] has either the shape of
// indices (one row per pair) or that shape without its last axis (a row shared by the pair's k
// experts). Output indices.shape + [N], in x's dtype. An id outside [0, E) gives a row of zeros.
mx::array gather_qmm(const mx::array& x, const mx::array& w, const mx::array& scales,
                     const std::optional<mx::array>& biases, const mx::array& indices, int group_size,
                     int bits, mx::StreamOrDevice s = {});

// The float form of gather_qmm: expert stacks w [E, N, K] float32 or bfloat16 -> indices.shape + [N] float32.
mx::array gather_mm(const mx::array& x, const mx::array& w, const mx::array& indices, mx::StreamOrDevice s = {});

// x [..., K] @ w^T for float32 or bfloat16 weights w [N, K] -> [..., N] in float32 (bfloat16
// weights are widened in registers, never copied). Batched: x [..., H, M, K] @ w [..., Hw, N, K]^T
// with Hw dividing H (x batch h uses weight batch h / (H / Hw), as grouped-query attention needs).
mx::array matmul(const mx::array& x, const mx::array& w, mx::StreamOrDevice s = {});

// softmax(scale * q k^T) v for one query row per head: q [B, H, 1, D], k and v [B, Hkv, S, D] float32
// (any strides: the cache is read in place), Hkv dividing H -> [B, H, 1, D] float32.
mx::array decode_attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                           mx::StreamOrDevice s = {});

// The same for a batch of sequences at different lengths, each in its own cache buffer: q [B, H, 1, D],
// keys[b] and values[b] [1, Hkv, capacity_b, D] float32 of which row b sees the first lengths[b].
// A row's result is bit-identical to decode_attention on that sequence alone.
mx::array ragged_decode_attention(const mx::array& q, const std::vector<mx::array>& keys,
                                  const std::vector<mx::array>& values, const std::vector<int>& lengths, float scale,
                                  mx::StreamOrDevice s = {});

// Writes keys and values [B, Hkv, L, D] (float32, any strides) of a batch of sequences into each one's
// cache buffers kbufs[b], vbufs[b] [1, Hkv, capacity_b, D] at positions[b] .. positions[b] + L - 1, in place
// (a strided buffer is copied first) -> the 2B updated buffers k_0, v_0, k_1, v_1, ...
std::vector<mx::array> kv_append(const mx::array& keys, const mx::array& values, const std::vector<mx::array>& kbufs,
                                 const std::vector<mx::array>& vbufs, const std::vector<int>& positions,
                                 mx::StreamOrDevice s = {});

// softmax(scale * q k^T [+ causal mask aligned to the keys' end]) v for any number of query rows:
// q [B, H, L, D], k and v [B, Hkv, S, D] float32 (any strides), Hkv dividing H -> [B, H, L, D] float32.
// Blocked over keys with an online softmax: no [H, L, S] score matrix is held.
mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal,
                    mx::StreamOrDevice s = {});

// Attention on a quantized cache (MLX affine rows, as mx.quantize lays out [B, Hkv, S, D]): keys and values
// each (words uint32 [B, Hkv, S, D * bits / 32], scales, biases float32 [B, Hkv, S, D / group_size]), read in
// place; blocks of 64 keys are expanded in scratch, never the whole cache. q [B, H, L, D] -> [B, H, L, D].
mx::array quantized_attention(const mx::array& q, const std::vector<mx::array>& keys,
                              const std::vector<mx::array>& values, float scale, bool causal, int group_size, int bits,
                              mx::StreamOrDevice s = {});

// Expert routing: softmax over logits [..., E] (float32), the k most probable experts (descending) ->
// (indices [..., k] uint32, probabilities [..., k] float32, renormalised to sum 1 if norm_topk_prob).
std::vector<mx::array> route(const mx::array& logits, int k, bool norm_topk_prob, mx::StreamOrDevice s = {});

// silu(gate) * up, float32, same shapes.
mx::array swiglu(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s = {});
// Gated delta rule over [B, H, L, *] (q already L2-normed and scaled, k normed; float32): (out, new state).
std::vector<mx::array> gated_delta(const mx::array& q, const mx::array& k, const mx::array& v, const mx::array& g,
                                   const mx::array& beta, const mx::array& state, mx::StreamOrDevice s = {});

// x * rsqrt(mean(x^2, -1) + eps) * weight: x [..., D] float32, weight [D] float32 or bfloat16 -> float32.
mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s = {});

// Rotary embedding of whole heads in HF's half-split layout: x [B, H, L, D] float32 (any strides),
// times mscale, rotated by angles (offset + l) * inv_freq [D / 2] -> [B, H, L, D] float32. `offset`: one
// for every row, or one per batch row (sequences at different lengths).
mx::array rope(const mx::array& x, const mx::array& inv_freq, const std::variant<int64_t, std::vector<int64_t>>& offset,
               float mscale, mx::StreamOrDevice s = {});

// The Gated DeltaNet's causal depthwise conv and its SiLU: x [B, L, C] after `state` [B, K - 1, C] (the previous
// inputs; zeros when absent) with w [C, K] (or [C, K, 1]) -> (silu(conv) [B, L, C], the new state [B, K - 1, C]).
std::vector<mx::array> causal_conv(const mx::array& x, const mx::array& w, const std::optional<mx::array>& state,
                                   mx::StreamOrDevice s = {});

// Rows of an MLX-affine-quantized table [vocab, K * bits / 32] (scales, biases [vocab, K / group_size]) for token
// ids of any shape -> ids.shape + [K] float32, the values MLX's dequantize gives (rounded in the scales' dtype).
// Negative ids count from the end; ids outside the table give rows of zeros.
mx::array quantized_embedding(const mx::array& ids, const mx::array& w, const mx::array& scales, const mx::array& biases,
                              int group_size, int bits, mx::StreamOrDevice s = {});

// Whole decoder layers for one decoded position of one sequence (decoder_layers.cpp), built once from the
// layers' weights and called per token. `arrays` holds per layer: input norm, q norm, k norm, [post-attention
// norm,] each projection's weight (float32/bfloat16 [N, K], or MLX affine words, scales[, biases]) in the order
// q, k, v, o[, gate, up, down]; `projs` holds (bits or 0 for float, group_size, has_biases) per projection.
// Without `mlp` a layer ends after the attention residual (a mixture-of-experts layer runs its MLP unfused).
// The weights are held (evaluated, contiguous) by the plan, not passed per call: a call's graph node has only
// the activation and the caches as inputs.
class DecoderPlan {
 public:
  DecoderPlan(const mx::array& inv_freq, const std::vector<mx::array>& arrays, const std::vector<int>& projs, int heads,
              int kv_heads, float eps, float scale, float mscale, bool mlp);
  // x [..., hidden] (one position) and each layer's float32 key and value buffers [1, kv_heads, capacity,
  // head_dim] (k_0, v_0, k_1, ...): the new rows go to position `offset`, in place -> [hidden after the layers,
  // k_0, v_0, ...].
  std::vector<mx::array> operator()(const mx::array& x, const std::vector<mx::array>& kv, int64_t offset,
                                    mx::StreamOrDevice s = {}) const;
  int layers() const;
  struct Data;

 private:
  std::shared_ptr<const Data> data_;
};

// Best of `repeats` reads of an nbytes buffer on the kernels' threads, in GB/s.
double read_bandwidth_gbs(int64_t nbytes, int repeats);

// Name of the instruction set the kernels run with, and the threads they use.
const char* isa_name();
int threads();

}  // namespace q3k
