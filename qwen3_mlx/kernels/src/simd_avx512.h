// The AVX-512 layer (simd.h): 16 floats a vector, 32 zmm registers. Compiled only into
// kernels_avx512.cpp (-mavx512f/bw/vl/dq, CMakeLists.txt), run only where the CPU has them all.
#pragma once

#include <immintrin.h>

#include "simd.h"

#define Q3K_ISA avx512
#define Q3K_NAME "avx512"
#define Q3K_X86 _mm512
// Tiles within the 32 zmm registers: accumulators + loads + 1 broadcast (or activation row load).
#define Q3K_MR 6     // GEMM: 6 x 4 accumulators + 4 weight loads + 1 activation load = 29 registers
#define Q3K_NR 4     // (7 x 4 would need 33)
#define Q3K_FS_MR 6  // flash scores: 6 x 4 + 4 key loads + 1 query broadcast = 29
#define Q3K_FS_NV 4  // 4 x 16 = 64 keys, a whole key block (kFlashKeys) per pass
#define Q3K_FV_MR 5  // flash P@V: 5 x 4 + 4 value loads + 1 probability broadcast = 25
#define Q3K_FV_NV 4  // 4 x 16 = 64: D is padded to a multiple of 64, so 64 and 128 need no padding

namespace q3k::avx512 {

using VF = __m512;
static inline __m256 fold8(VF v) { return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)); }
static inline VF vround(VF x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline VF vscale2n(VF p, VF n) { return _mm512_scalef_ps(p, n); }  // p * 2^n in one instruction

// The integer side of the decoders (simd_x86.h): W bytes, W uint16, and two ops named by width.
static inline __m128i load_u8(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
static inline __m256i load_u16(const uint16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
static inline __m512i vand(__m512i a, __m512i b) { return _mm512_and_si512(a, b); }
static inline VF as_float(__m512i v) { return _mm512_castsi512_ps(v); }

// 4-bit decode by table: one 16-entry table per group holds s * q + b for q = 0..15, and vpermps
// picks entries by the low 4 bits of each lane, so a nibble becomes its dequantized float in one
// shuffle (no mask, no int->float convert; the ALU ports, not memory, bound the plain decode).
constexpr bool kLut4 = true;
static inline VF lut4(float s, float b) {
  const VF q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_fmadd_ps(q, _mm512_set1_ps(s), _mm512_set1_ps(b));
}
// From a float32 (scale, bias) pair in memory: broadcast loads, no shuffle.
static inline VF lut4m(const float* sb) { return lut4(sb[0], sb[1]); }
static inline void deq4(const uint8_t* p, VF lut, VF& lo, VF& hi) {
  const __m512i v = _mm512_cvtepu8_epi32(load_u8(p));
  lo = _mm512_permutexvar_ps(v, lut);
  hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
}

}  // namespace q3k::avx512

#include "simd_x86.h"
