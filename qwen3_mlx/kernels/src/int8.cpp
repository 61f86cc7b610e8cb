#include "int8.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace q3k {

#if !defined(Q3K_X86)
const Int8Kernels* int8_avx512_vnni() { return nullptr; }
const Int8Kernels* int8_avx_vnni() { return nullptr; }
#endif

const Int8Kernels* int8_detected() {
  static const Int8Kernels* found = []() -> const Int8Kernels* {
    // The integer tables ride on the float table's set: a cap on the ISA caps them too.
    const char* isa = kernels().name;
#if defined(Q3K_X86)
    __builtin_cpu_init();
    if (std::strcmp(isa, "avx512") == 0 && __builtin_cpu_supports("avx512vnni")) return int8_avx512_vnni();
    if (std::strcmp(isa, "generic") != 0 && __builtin_cpu_supports("avxvnni")) return int8_avx_vnni();
#endif
    (void)isa;
    return nullptr;
  }();
  return found;
}

namespace {
std::atomic<int>& int8_mode() {
  static std::atomic<int> mode{[] {
    const char* v = std::getenv("QWEN3_MLX_INT8");
    if (v && std::strcmp(v, "0") == 0) return 0;
    if (v && std::strcmp(v, "all") == 0) return 2;
    return 1;
  }()};
  return mode;
}
}  // namespace

const Int8Kernels* int8_kernels(int path_rows) {
  const int mode = int8_mode().load(std::memory_order_relaxed);
  if (mode == 0 || (mode == 1 && path_rows <= gemv_max_rows())) return nullptr;
  return int8_detected();
}

bool set_int8(int mode) {
  int8_mode().store(mode < 0 ? 0 : (mode > 2 ? 2 : mode));
  return int8_detected() != nullptr;
}

void QuantizedActivations::prepare(const float* x, const int32_t* xrows, int M, int K, int gs, int bits,
                                   bool biases, int path_rows) {
  const Kernels& k = kernels();
  const int G = K / gs;
  K_ = K, G_ = G, xf_ = nullptr, sums_view_ = nullptr, x8_ = X8{};
  const Int8Kernels* t = int8_kernels(path_rows);
  if (!t) {
    // Group sums only where the kernel reads them (not per call in the AVX-512 4-bit decode).
    float* xs = biases && (bits == 8 || k.q4_sums) ? sums_.get(static_cast<size_t>(M) * G) : nullptr;
    float* xq = x_.get(static_cast<size_t>(M) * K);
    prepare_x(k, x, xrows, M, K, gs, bits == 4, xq, xs);
    xf_ = xq, sums_view_ = xs;
    return;
  }
  const int C = chunk_values(*t, bits);
  const int64_t Kp = padded_k(*t, K, bits), ldg = G + t->lanes, whole = static_cast<int64_t>(K) / C * C;
  int8_t* codes = reinterpret_cast<int8_t*>(codes_.get(static_cast<size_t>(M) * Kp / 4 + 1));
  float* d = d_.get(static_cast<size_t>(M) * ldg);
  float* xs = xs_.get(static_cast<size_t>(M) * ldg);
  for (int i = 0; i < M; ++i) {
    int8_t* row = codes + i * Kp;
    float *di = d + i * ldg, *xsi = xs + i * ldg;
    std::memset(row + whole, 0, Kp - whole);  // the last, partial chunk (its order mixes values and padding)
    t->quantize(x + static_cast<int64_t>(xrows ? xrows[i] : i) * K, K, gs, bits, row, di, xsi);
    for (int g = G; g < ldg; ++g) di[g] = xsi[g] = 0.f;
  }
  x8_.codes = codes, x8_.ld = Kp, x8_.d = d, x8_.xs = xs, x8_.ldg = ldg;
}

void QuantizedActivations::into(MatArgs& a, int64_t row) const {
  a.x = xf_ ? xf_ + row * K_ : nullptr, a.ldx = K_;
  a.xsum = sums_view_ ? sums_view_ + row * G_ : nullptr;
  a.x8 = x8_;
  if (x8_.codes) a.x8.codes += row * x8_.ld, a.x8.d += row * x8_.ldg, a.x8.xs += row * x8_.ldg;
}

}  // namespace q3k
