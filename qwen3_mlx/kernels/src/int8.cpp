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

X8 X8Buffers::prepare(const Int8Kernels& t, const float* x, const int32_t* xrows, int M, int K, int gs, int bits) {
  const int G = K / gs, vl = 32 / bits, C = chunk_values(t, bits), half = C / 2;
  const int64_t Kp = padded_k(t, K, bits), ldl = Kp / vl;
  int8_t* codes = reinterpret_cast<int8_t*>(this->codes.get(static_cast<size_t>(M) * Kp / 4 + 1));
  float* d = this->d.get(static_cast<size_t>(M) * G);
  float* xs = this->xs.get(static_cast<size_t>(M) * G);
  float* dl = this->dl.get(static_cast<size_t>(M) * ldl);
  for (int i = 0; i < M; ++i) {
    const float* src = x + static_cast<int64_t>(xrows ? xrows[i] : i) * K;
    int8_t* dst = codes + static_cast<int64_t>(i) * Kp;
    float* di = d + static_cast<int64_t>(i) * G;
    t.quantize(src, K, gs, bits, dst, di, xs + static_cast<int64_t>(i) * G);
    for (int64_t v = K; v < Kp; ++v) dst[bits == 8 ? v : (v / C) * C + (v % 2) * half + (v % C) / 2] = 0;
    float* li = dl + static_cast<int64_t>(i) * ldl;
    for (int64_t l = 0; l < ldl; ++l) li[l] = l * vl < K ? di[l * vl / gs] : 0.f;
  }
  X8 v;
  v.codes = codes, v.ld = Kp, v.d = d, v.xs = xs, v.ldg = G, v.dl = dl, v.ldl = ldl;
  return v;
}

}  // namespace q3k
