// Shared checks and argument set-up for the primitives.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kernels.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/scheduler.h"
#include "ops.h"

namespace q3k {

[[noreturn]] inline void fail(const std::string& what) { throw std::invalid_argument("qwen3_mlx kernels: " + what); }

// Checks an argument; the message is built only when the check fails (the ops run per call, per layer, per
// token: building every message eagerly cost ~1 ms of a decode step's graph building).
#define Q3K_REQUIRE(ok, what)   \
  do {                          \
    if (!(ok)) ::q3k::fail(what); \
  } while (0)

// A function whose products and sums must round one by one, as MLX's separate ops do: GCC contracts a * b + c
// into a fused multiply-add by default, across statements; clang only within one expression, so such functions
// also compute the product in a statement of its own.
#if defined(__GNUC__) && !defined(__clang__)
#define Q3K_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define Q3K_NO_CONTRACT
#endif

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
  Q3K_REQUIRE(bits == 4 || bits == 8, "bits must be 4 or 8, got " + std::to_string(bits));
  Q3K_REQUIRE(group_size == 32 || group_size == 64 || group_size == 128,
          "group_size must be 32, 64 or 128, got " + std::to_string(group_size));
  Q3K_REQUIRE(w.dtype() == mx::uint32, "quantized weight must be uint32");
  Q3K_REQUIRE(static_cast<int>(w.ndim()) == 2 + lead_dims, "weight must have " + std::to_string(2 + lead_dims) +
                                                            " dims, got " + shape_str(w));
  const int N = w.shape(-2);
  Q3K_REQUIRE(K > 0, "input dims must be positive");
  Q3K_REQUIRE(K % group_size == 0, "input dims " + std::to_string(K) + " not a multiple of the group size");
  Q3K_REQUIRE(static_cast<int64_t>(w.shape(-1)) * 32 == static_cast<int64_t>(K) * bits,
          "weight " + shape_str(w) + " does not match input dims " + std::to_string(K) + " at " +
              std::to_string(bits) + " bits");
  auto sshape = w.shape();
  sshape.back() = K / group_size;
  Q3K_REQUIRE(scales.shape() == sshape, "scales " + shape_str(scales) + " do not match weight " + shape_str(w));
  scale_type(scales.dtype());
  if (biases) {
    Q3K_REQUIRE(biases->shape() == sshape, "biases " + shape_str(*biases) + " do not match weight " + shape_str(w));
    Q3K_REQUIRE(biases->dtype() == scales.dtype(), "biases and scales must have the same dtype");
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

// An input's layout, read in eval_cpu: activations are taken as they come (a contiguous() node per
// call costs ~10 us of MLX scheduling, ~200 per decoded token) and copied row-major only if strided.
struct Layout {
  bool contiguous = true;
  mx::Shape shape;
  mx::Strides strides;
  explicit Layout(const mx::array& a)
      : contiguous(a.flags().row_contiguous), shape(a.shape()), strides(a.strides()) {}
  Layout(mx::Shape s, mx::Strides st) : contiguous(false), shape(std::move(s)), strides(std::move(st)) {}
};

// All elements of a strided array into dst, row-major.
template <typename T>
void copy_rows(const T* src, const Layout& l, T* dst) {
  const int nd = static_cast<int>(l.shape.size());
  if (nd == 0) {
    dst[0] = src[0];
    return;
  }
  const int64_t inner = l.shape[nd - 1], is = l.strides[nd - 1];
  int64_t outer = 1;
  for (int i = 0; i < nd - 1; ++i) outer *= l.shape[i];
  std::vector<int64_t> idx(nd > 1 ? nd - 1 : 1, 0);
  for (int64_t r = 0; r < outer; ++r) {
    int64_t off = 0;
    for (int i = 0; i < nd - 1; ++i) off += idx[i] * l.strides[i];
    for (int64_t c = 0; c < inner; ++c) dst[r * inner + c] = src[off + c * is];
    for (int i = nd - 2; i >= 0; --i) {
      if (++idx[i] < l.shape[i]) break;
      idx[i] = 0;
    }
  }
}

// Allocates a primitive's output in eval_cpu. MLX runs eval_cpu on the calling thread up to ~100
// dispatches ahead of the stream thread that computes, and outputs are allocated then: with ~22 nodes
// per decoder layer that kept 3-4 layers of prefill activations alive at once (+25% peak at a 512-token
// chunk). A large output (256 KB: a prefill chunk of 64+ tokens) first lets the stream catch up to
// within one task, so about one layer's activations are in flight; decode's outputs are small and keep
// the full look-ahead (measured: decode step unchanged, 4-layer test model's 299-token prefill 18 -> 8 MB).
constexpr size_t kLargeOutput = size_t(1) << 18;
inline void alloc_output(mx::array& y) {
  if (y.nbytes() >= kLargeOutput)
    while (mx::scheduler::n_active_tasks() > 1) mx::scheduler::wait_for_one();
  y.set_data(mx::allocator::malloc(y.nbytes()));
}

// Base of every primitive here: CPU only (the Python seam sends GPU streams to MLX's own ops).
class CpuPrimitive : public mx::Primitive {
 public:
  using mx::Primitive::Primitive;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("qwen3_mlx kernels run on the CPU only");
  }
};

// The stream's command encoder with the primitive's inputs and outputs registered.
inline mx::cpu::CommandEncoder& encoder(mx::Stream s, const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  auto& enc = mx::cpu::get_command_encoder(s);
  for (const auto& a : in) enc.set_input_array(a);
  for (auto& a : out) enc.set_output_array(a);
  return enc;
}

inline mx::Dtype float_out(mx::Dtype d) {
  return (d == mx::bfloat16 || d == mx::float16 || d == mx::float32) ? d : mx::float32;
}

}  // namespace q3k
