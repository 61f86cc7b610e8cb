// The integer kernels for AVX-VNNI, the 256-bit VNNI of AVX2-only cores (this file's flags:
// CMakeLists.txt): 8 lanes, 32-byte chunks.
#include "simd_avx2.h"

#define Q3K_I8_NAME "avx-vnni"
#define Q3K_I8_MR 4   // decode: 4 accumulators + 4 products + lo, hi, lane scales, index: 12 of 16 registers
#define Q3K_I8_GM 2   // prefill: 2 x 2 integer + 2 x 2 float accumulators + 2 weight vectors + 1 broadcast
#define Q3K_I8_GNV 2  // + 2 scale vectors + 1 row scale = 14 registers

namespace q3k::avx2 {

using VI = __m256i;
static inline VI izero() { return _mm256_setzero_si256(); }
static inline VI iload(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
// n is 16 (a chunk's tail is a multiple of 16 bytes)
static inline VI iload_part(const void* p, int) {
  return _mm256_zextsi128_si256(_mm_loadu_si128(static_cast<const __m128i*>(p)));
}
static inline void istore(void* p, VI v) { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
static inline void split_even_odd(VI a, VI b, VI& ev, VI& od) {
  const VI e = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);  // each half: evens then odds
  const VI pa = _mm256_permutevar8x32_epi32(a, e), pb = _mm256_permutevar8x32_epi32(b, e);
  ev = _mm256_permute2x128_si256(pa, pb, 0x20);
  od = _mm256_permute2x128_si256(pa, pb, 0x31);
}
static inline void store_codes(int8_t* p, VI v) {
  const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(w16, w16));
}
static inline VF vabs(VF v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), v); }
static inline VI dot4(VI acc, VI u, VI s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
static inline VF permute(VI idx, VF v) { return _mm256_permutevar8x32_ps(v, idx); }

}  // namespace q3k::avx2

#include "int8_x86.h"
#include "int8_body.h"

const q3k::Int8Kernels* q3k::int8_avx_vnni() { return &avx2::int8_table(); }
