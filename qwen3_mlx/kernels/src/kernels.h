// The matmul kernels behind every primitive, one table per instruction set (chosen at run time).
//
// One computation covers all weight formats: y[m, n] = sum_k x[m, k] * w[n, k], with w a row of
// MLX's affine quantization (w = scale * q + bias per group of `gs` values), bfloat16 or float32.
#pragma once

#include <cstdint>

namespace q3k {

enum class WType { Q4, Q8, BF16, F32 };
enum class SType { F32, BF16, F16 };  // dtype of scales and biases

// Activations quantized to int8 for the integer kernels (int8.h): row m's codes at codes + m * ld bytes,
// its group scales d and group sums xs at m * ldg.
struct X8 {
  const int8_t* codes = nullptr;
  int64_t ld = 0;
  const float* d = nullptr;
  const float* xs = nullptr;
  int64_t ldg = 0;
};

struct MatArgs {
  // Activations after prepare_x: M rows of K floats, row stride ldx; for Q4 in the kernel's lane order.
  const float* x = nullptr;
  int64_t ldx = 0;
  int M = 0;
  // Rows that choose the kernel (decode, blocked or BLAS): the positions of one sequence in this call, not
  // the rows of the batch or of one expert, so each row's result is bit-identical whether its sequence runs
  // alone, batched with others, or prefilled in other chunks of the same kernel class (a server's greedy
  // requests rely on it). 0: M.
  int path_rows = 0;
  const float* xsum = nullptr;  // [M, K / gs] group sums of x (quantized weights with biases)
  X8 x8;  // the integer kernels' activations (int8.h); x and xsum unused by them
  // Weights: N rows of K values; row n starts at w + n * w_row_bytes.
  const void* w = nullptr;
  int64_t w_row_bytes = 0;
  WType wt = WType::F32;
  const void* scales = nullptr;  // [N, K / gs]
  const void* biases = nullptr;  // [N, K / gs] or null
  SType st = SType::F32;
  int N = 0, K = 0, gs = 0;
  // Output: x row m goes to y + (yrows ? yrows[m] : m) * ldy.
  float* y = nullptr;
  int64_t ldy = 0;
  const int32_t* yrows = nullptr;
};

// One query row per head against a cache: out = softmax(scale * q k^T) v for the `rep` query heads
// that share one key/value head (grouped-query attention). k and v rows (D floats, contiguous) are
// `ks` / `vs` floats apart, so a slice of a larger cache buffer is read in place.
struct AttnArgs {
  const float* q = nullptr;  // [rep, D]
  const float* k = nullptr;  // S rows
  const float* v = nullptr;  // S rows
  int64_t ks = 0, vs = 0;
  int rep = 0, S = 0, D = 0;
  float scale = 1.f;
  float* out = nullptr;     // [rep, D]
  float* scores = nullptr;  // scratch [rep, S]
  // Split-K: when set, out is left unnormalised and each row's score max and exp-sum go here, for the
  // caller to merge the key ranges.
  float* row_max = nullptr;  // [rep]
  float* row_sum = nullptr;  // [rep]
};

// Prefill attention for one task: R query rows (rep heads x nq positions, row r = head r / nq,
// position r % nq) against S keys, blocked over keys with an online softmax, never a score matrix.
// Causal: row r sees keys [0, first_limit + r % nq]. Scratch is the caller's (per thread).
constexpr int kFlashKeys = 64;  // keys per block
struct FlashArgs {
  const float* q = nullptr;  // [R, D], already scaled
  const float* k = nullptr;  // key c, element d at k[c * ks + d * kd]
  const float* v = nullptr;
  int64_t ks = 0, kd = 1, vs = 0, vd = 1;
  int R = 0, nq = 1, D = 0, Dp = 0, S = 0;  // Dp: D rounded up to Kernels::flash_dpad
  bool causal = false;
  int first_limit = 0;
  float* out = nullptr;  // row r -> out + (r / nq) * out_head + (r % nq) * D
  int64_t out_head = 0;
  // scratch: kt [D * kFlashKeys], vp [kFlashKeys * Dp], s [R * kFlashKeys], o [R * Dp], m [R], l [R]
  float *kt = nullptr, *vp = nullptr, *s = nullptr, *o = nullptr, *m = nullptr, *l = nullptr;
  // A quantized cache (MLX affine rows of D values, one row per key): when set, k / v above are unused and
  // each block of keys and values is expanded here (stage: scratch [kFlashKeys * D]) instead.
  const MatArgs* kq = nullptr;
  const MatArgs* vq = nullptr;
  float* stage = nullptr;
};

// One head of the gated delta rule over L tokens, the state S [Dk, Dv] updated in place:
// S <- exp(g_t) S;  S <- S + k_t (beta_t (v_t - S^T k_t))^T;  out_t = S^T q_t.
struct DeltaArgs {
  const float *q = nullptr, *k = nullptr, *v = nullptr, *g = nullptr, *beta = nullptr;
  int64_t qs = 0, ks = 0, vs = 0, gst = 1, bst = 1, os = 0;  // row strides (q, k, v, out), g and beta strides
  int L = 0, Dk = 0, Dv = 0;
  float* S = nullptr;
  float* out = nullptr;
  float* kv = nullptr;  // scratch [Dv]
};

struct Kernels {
  const char* name;
  // Q4 activations are reordered in blocks of 2 * lanes values: the even ones, then the odd ones
  // (the low and high nibbles of `lanes` packed bytes).
  int lanes;
  // Whether 4-bit rows read the activations' group sums (the s * sum(xq) + b * sum(x) form); the
  // table-lookup decode applies the bias per weight and needs none.
  bool q4_sums;
  // Rows [n0, n1) of the output for all M rows, reading each weight once (M small: decode).
  void (*gemv)(const MatArgs& a, int n0, int n1);
  // The same for many rows: rows [n0, n1) of the weight are expanded to floats into `tile`
  // ((n1 - n0) * K floats; unused for F32) and reused across all M rows.
  void (*gemm)(const MatArgs& a, int n0, int n1, float* tile);
  // Rows [n0, n1) of a quantized or bfloat16 weight as floats into tile [(n1 - n0) * K]. Q4 rows come in
  // the lane order above (within each 2 * lanes values: the even ones, then the odd ones).
  void (*expand)(const MatArgs& a, int n0, int n1, float* tile);
  int flash_dpad;  // FlashArgs::Dp is D rounded up to a multiple of this
  void (*attend)(const AttnArgs& a);
  void (*flash)(const FlashArgs& a);
  // out[i] = silu(g[i]) * u[i]
  void (*swiglu)(const float* g, const float* u, float* out, int64_t n);
  void (*delta_rule)(const DeltaArgs& a);
};

const Kernels& kernels_avx512();
const Kernels& kernels_avx2();
const Kernels& kernels_generic();

// The best table this CPU runs (QWEN3_MLX_ISA=avx512|avx2|generic caps it, for tests).
const Kernels& kernels();

// Where value d of a row expanded by `expand` lands: Q4 rows are in the kernels' lane order.
inline int expanded_pos(int d, bool q4, int lanes) {
  if (!q4) return d;
  const int block = d / (2 * lanes), i = d % (2 * lanes);
  return block * 2 * lanes + (i % 2 ? lanes + i / 2 : i / 2);
}

// x rows (xrows ? xrows[i] : i) of a row-major [*, K] float matrix -> out rows i in [0, M), in the
// lane order of `k` when perm4, plus the group sums xsum [M, K / gs] when xsum is not null.
void prepare_x(const Kernels& k, const float* x, const int32_t* xrows, int M, int K, int gs, bool perm4,
               float* out, float* xsum);

}  // namespace q3k
