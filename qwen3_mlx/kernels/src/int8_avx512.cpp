// The integer kernels for AVX512-VNNI (this file's flags: CMakeLists.txt): 16 lanes, 64-byte chunks.
#include "simd_avx512.h"

#define Q3K_I8_NAME "avx512-vnni"
#define Q3K_I8_MR 8   // decode: 8 accumulators + 8 products + lo, hi, lane scales, index: 28 of 32 registers
#define Q3K_I8_GM 4   // prefill: 4 x 2 integer + 4 x 2 float accumulators + 2 weight vectors + 1 broadcast
#define Q3K_I8_GNV 2  // + 2 scale vectors + 1 row scale = 22 registers

namespace q3k::avx512 {

using VI = __m512i;
static inline VI izero() { return _mm512_setzero_si512(); }
static inline VI iload(const void* p) { return _mm512_loadu_si512(p); }
static inline VI iload_part(const void* p, int n) { return _mm512_maskz_loadu_epi8((__mmask64(1) << n) - 1, p); }
static inline void istore(void* p, VI v) { _mm512_storeu_si512(p, v); }
static inline void split_even_odd(VI a, VI b, VI& ev, VI& od) {
  const VI e = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  ev = _mm512_permutex2var_epi32(a, e, b);
  od = _mm512_permutex2var_epi32(a, _mm512_add_epi32(e, _mm512_set1_epi32(1)), b);
}
static inline void store_codes(int8_t* p, VI v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(v)); }
static inline VF vabs(VF v) { return _mm512_abs_ps(v); }
static inline VI dot4(VI acc, VI u, VI s) { return _mm512_dpbusd_epi32(acc, u, s); }
static inline VF permute(VI idx, VF v) { return _mm512_permutexvar_ps(idx, v); }

}  // namespace q3k::avx512

#include "int8_x86.h"
#include "int8_body.h"

const q3k::Int8Kernels* q3k::int8_avx512_vnni() { return &avx512::int8_table(); }
