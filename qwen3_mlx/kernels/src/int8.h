// Integer dot products for quantized weights (x86 VNNI): activations quantized to int8 on the fly, one
// scale per group of the weight's group size, and multiplied with `vpdpbusd` (4 unsigned weight codes x
// 4 signed activation codes summed into each 32-bit lane: 4x the multiply-adds of a float FMA).
//
// The arithmetic, which tests/test_int8.py computes again in numpy bit for bit (QWEN3_MLX_INT8=0
// keeps the float path). For activation row m and group g (gs values of x):
//   d = amax / 127,  c_k = rint(x_k * (127 / amax))   (0 when amax is 0; |c_k| <= 127)
//   xs_g = d * sum(c_k)                                 (float32)
// For weight row n (codes q_k, scale s_g, bias b_g): the row's bytes are read in chunks of 4 * L bytes
// (L 32-bit lanes: 16 for AVX-512, 8 for AVX-VNNI's 256-bit form); lane l of chunk j holds the exact
// integer sum of c_k q_k over its 32 / bits values, and
//   acc_l += float(isum_l) * (s_g * d_g)     (g the lane's group; products and sums rounded one by one)
//   yb    = sum over g in order of b_g * xs_g
//   y     = halving_sum(acc) + yb             (lanes i and i + L/2 added, then i and i + L/4, ...)
// Using d * sum(c) rather than sum(x) for the bias term makes each product (s q + b)(d c): the weight as
// dequantized times the activation as quantized, whose error is smaller than that of s q against it.
#pragma once

#include <cstdint>

#include "driver.h"
#include "kernels.h"

namespace q3k {

// The integer kernels' activations (X8, kernels.h): codes in the table's chunk order for 4-bit weights
// (each 8 * L values: the 4 * L even ones, then the odd ones: the order of a chunk's low and high nibbles),
// zero-padded to whole chunks; d and xs as above, each row's G values followed by L zeros (the decode
// reads L groups' scales at once from the chunk's first group).

struct Int8Kernels {
  const char* name;
  int lanes;  // L above
  // One activation row [K]: codes (K values in chunk order; the padding is the caller's), d and xs [K / gs].
  void (*quantize)(const float* x, int K, int gs, int bits, int8_t* codes, float* d, float* xs);
  // Rows [n0, n1) of the product for all M rows of a.x8 (a.x and a.xsum unused): the decode arithmetic
  // above, and the prefill one (gemm8 in int8_body.h: the block's weights repacked once for all the rows).
  void (*gemv)(const MatArgs& a, int n0, int n1);
  void (*gemm)(const MatArgs& a, int n0, int n1);
};

const Int8Kernels* int8_avx512_vnni();
const Int8Kernels* int8_avx_vnni();

// The table this CPU has, or null: no VNNI, or QWEN3_MLX_ISA capping below the set (avx512 for
// AVX512-VNNI, avx2 for AVX-VNNI).
const Int8Kernels* int8_detected();
// The table a product of `path_rows` positions of one sequence runs, or null for the float path. Mode 1,
// the default: prefill only (more than gemv_max_rows positions), where the integer products pay; decode
// is bound by per-token overhead, and there the integer path measured no faster in whole models (the
// MoE shape slower). Mode 2 (QWEN3_MLX_INT8=all): decode too. Mode 0 (QWEN3_MLX_INT8=0): never.
// set_int8 changes the mode for the calls evaluated after and returns whether this CPU has a table.
const Int8Kernels* int8_kernels(int path_rows);
bool set_int8(int mode);

// Values per chunk for `bits`-bit weights, and the padded row length in bytes of the codes.
inline int chunk_values(const Int8Kernels& t, int bits) { return t.lanes * 4 * (8 / bits); }
inline int64_t padded_k(const Int8Kernels& t, int K, int bits) {
  const int c = chunk_values(t, bits);
  return (static_cast<int64_t>(K) + c - 1) / c * c;
}

// A quantized product's activations, prepared once per call for the path it takes: int8 codes for the
// integer kernels, else float rows (in the float table's lane order for 4 bits) and group sums where that
// table reads them. Buffers are the caller's thread's, grown on demand and reused.
class QuantizedActivations {
 public:
  // x rows (xrows ? xrows[i] : i) of a row-major [*, K] float matrix, for `path_rows` positions of one
  // sequence (which choose integer or float, as they choose the kernel).
  void prepare(const float* x, const int32_t* xrows, int M, int K, int gs, int bits, bool biases, int path_rows);
  // The activation fields of `a` for the rows from `row` on.
  void into(MatArgs& a, int64_t row) const;

 private:
  Scratch x_, sums_, codes_, d_, xs_;
  const float* xf_ = nullptr;
  const float* sums_view_ = nullptr;
  X8 x8_;
  int64_t K_ = 0, G_ = 0;
};

}  // namespace q3k
