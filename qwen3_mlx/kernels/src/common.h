// Shared checks and argument set-up for the primitives.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

#include "kernels.h"
#include "ops.h"

namespace q3k {

inline void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("qwen3_mlx kernels: " + what);
}

inline std::string shape_str(const mx::array& a) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < a.shape().size(); ++i) s << (i ? ", " : "") << a.shape()[i];
  s << ")";
  return s.str();
}

inline SType scale_type(mx::Dtype d) {
  if (d == mx::float32) return SType::F32;
  if (d == mx::bfloat16) return SType::BF16;
  if (d == mx::float16) return SType::F16;
  throw std::invalid_argument("qwen3_mlx kernels: scales must be float32, bfloat16 or float16");
}

// Checks a quantized weight [..., N, K * bits / 32] with scales/biases [..., N, K / gs] against K;
// returns N.
inline int check_quantized(const mx::array& w, const mx::array& scales, const std::optional<mx::array>& biases,
                           int K, int group_size, int bits, int lead_dims) {
  require(bits == 4 || bits == 8, "bits must be 4 or 8, got " + std::to_string(bits));
  require(group_size == 32 || group_size == 64 || group_size == 128,
          "group_size must be 32, 64 or 128, got " + std::to_string(group_size));
  require(w.dtype() == mx::uint32, "quantized weight must be uint32");
  require(static_cast<int>(w.ndim()) == 2 + lead_dims, "weight must have " + std::to_string(2 + lead_dims) +
                                                            " dims, got " + shape_str(w));
  const int N = w.shape(-2);
  require(K % group_size == 0, "input dims " + std::to_string(K) + " not a multiple of the group size");
  require(static_cast<int64_t>(w.shape(-1)) * 32 == static_cast<int64_t>(K) * bits,
          "weight " + shape_str(w) + " does not match input dims " + std::to_string(K) + " at " +
              std::to_string(bits) + " bits");
  auto sshape = w.shape();
  sshape.back() = K / group_size;
  require(scales.shape() == sshape, "scales " + shape_str(scales) + " do not match weight " + shape_str(w));
  scale_type(scales.dtype());
  if (biases) {
    require(biases->shape() == sshape, "biases " + shape_str(*biases) + " do not match weight " + shape_str(w));
    require(biases->dtype() == scales.dtype(), "biases and scales must have the same dtype");
  }
  return N;
}

// The array as a row-contiguous input. Weights are evaluated parameters that are already contiguous:
// passing them as they are spares a graph node per input per call (~8 us each on the CPU, ~600 per
// decoded token of the 0.6B model). Anything else (lazy or strided) goes through MLX's contiguous op.
inline mx::array as_input(const mx::array& a, mx::Stream s) {
  if (a.is_available() && a.flags().row_contiguous) return a;
  return mx::contiguous(a, false, s);
}

inline mx::Dtype float_out(mx::Dtype d) {
  return (d == mx::bfloat16 || d == mx::float16 || d == mx::float32) ? d : mx::float32;
}

}  // namespace q3k
