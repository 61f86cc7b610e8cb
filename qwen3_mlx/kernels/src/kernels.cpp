#include "kernels.h"

#include <cstdlib>
#include <cstring>

namespace q3k {

const Kernels& kernels() {
  static const Kernels* chosen = [] {
    const char* cap = std::getenv("QWEN3_MLX_ISA");
    auto allowed = [&](const char* name) {
      if (!cap || !*cap) return true;
      // The cap names the best set allowed: avx512 > avx2 > generic.
      const char* order[] = {"generic", "avx2", "avx512"};
      int c = -1, n = -1;
      for (int i = 0; i < 3; ++i) {
        if (std::strcmp(cap, order[i]) == 0) c = i;
        if (std::strcmp(name, order[i]) == 0) n = i;
      }
      return c < 0 || n <= c;
    };
#if defined(Q3K_X86)
    __builtin_cpu_init();
    // Every extension kernels_avx512.cpp is compiled with (see CMakeLists.txt), not just AVX512F.
    if (allowed("avx512") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return &kernels_avx512();
    if (allowed("avx2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
      return &kernels_avx2();
#endif
    (void)allowed;
    return &kernels_generic();
  }();
  return *chosen;
}

void prepare_x(const Kernels& k, const float* x, const int32_t* xrows, int M, int K, int gs, bool perm4,
               float* out, float* xsum) {
  const int block = 2 * k.lanes;
  for (int i = 0; i < M; ++i) {
    const float* src = x + static_cast<int64_t>(xrows ? xrows[i] : i) * K;
    float* dst = out + static_cast<int64_t>(i) * K;
    if (perm4) {
      // Block of 2L values: x[2t] to t, x[2t+1] to L + t (t < L), the order dec4 produces.
      for (int b = 0; b + block <= K; b += block)
        for (int t = 0; t < k.lanes; ++t) {
          dst[b + t] = src[b + 2 * t];
          dst[b + k.lanes + t] = src[b + 2 * t + 1];
        }
    } else {
      std::memcpy(dst, src, sizeof(float) * K);
    }
    if (xsum) {
      const int G = K / gs;
      for (int g = 0; g < G; ++g) {
        float s = 0.f;
        for (int j = 0; j < gs; ++j) s += src[g * gs + j];
        xsum[static_cast<int64_t>(i) * G + g] = s;
      }
    }
  }
}

}  // namespace q3k
