// The AVX2 + FMA layer (simd.h): 8 floats a vector, 16 ymm registers. Compiled only into
// kernels_avx2.cpp (-mavx2 -mfma -mf16c, CMakeLists.txt), run only where the CPU has them.
#pragma once

#include <immintrin.h>

#include "simd.h"

#define Q3K_ISA avx2
#define Q3K_NAME "avx2"
#define Q3K_X86 _mm256
// Tiles within the 16 ymm registers: accumulators + loads + 1 broadcast (or activation row load).
#define Q3K_MR 4     // GEMM: 4 x 3 accumulators + 3 weight loads + 1 activation load = 16, all of them
#define Q3K_NR 3
#define Q3K_FS_MR 5  // flash scores: 5 x 2 + 2 key loads + 1 query broadcast = 13
#define Q3K_FS_NV 2  // NV x 8 must divide the 64-key block; 4 would leave room for 2 rows (2 x 4 + 4 + 1 = 13)
#define Q3K_FV_MR 4  // flash P@V: 4 x 2 + 2 value loads + 1 probability broadcast = 11
#define Q3K_FV_NV 2  // 2 x 8 = 16: D is padded to a multiple of 16

namespace q3k::avx2 {

using VF = __m256;
static inline __m256 fold8(VF v) { return v; }
static inline VF vround(VF x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// p * 2^n with n + 127 put in a float's exponent field: AVX2 has no scalef.
static inline VF vscale2n(VF p, VF n) {
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// The integer side of the decoders (simd_x86.h): W bytes, W uint16, and two ops named by width.
static inline __m128i load_u8(const uint8_t* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }
static inline __m128i load_u16(const uint16_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
static inline __m256i vand(__m256i a, __m256i b) { return _mm256_and_si256(a, b); }
static inline VF as_float(__m256i v) { return _mm256_castsi256_ps(v); }

}  // namespace q3k::avx2

#include "simd_x86.h"
