// What AVX2 and AVX-512 share: the same instructions at two widths (_mm256_*, _mm512_*), so this part
// of the layer is written once, for the width prefix Q3K_X86 of the header that includes it last
// (simd_avx2.h or simd_avx512.h), over that header's VF and the operations whose names differ by more
// than the prefix (load_u8, load_u16, vand, as_float, fold8, vround, vscale2n).
#pragma once

#define Q3K_PASTE_(a, b) a##b
#define Q3K_PASTE(a, b) Q3K_PASTE_(a, b)
#define MM(op) Q3K_PASTE(Q3K_X86, _##op)  // MM(add_ps) -> _mm512_add_ps

namespace q3k::Q3K_ISA {

constexpr int W = sizeof(VF) / sizeof(float);
static inline VF vzero() { return MM(setzero_ps)(); }
static inline VF vset1(float f) { return MM(set1_ps)(f); }
static inline VF vload(const float* p) { return MM(loadu_ps)(p); }
static inline void vstore(float* p, VF v) { MM(storeu_ps)(p, v); }
static inline VF vadd(VF a, VF b) { return MM(add_ps)(a, b); }
static inline VF vmul(VF a, VF b) { return MM(mul_ps)(a, b); }
static inline VF vdiv(VF a, VF b) { return MM(div_ps)(a, b); }
static inline VF vmin(VF a, VF b) { return MM(min_ps)(a, b); }
static inline VF vmax(VF a, VF b) { return MM(max_ps)(a, b); }
static inline VF vfma(VF a, VF b, VF c) { return MM(fmadd_ps)(a, b, c); }
static inline VF vfnma(VF a, VF b, VF c) { return MM(fnmadd_ps)(a, b, c); }  // c - a * b

static inline float vsum(VF v) {
  const __m256 h = fold8(v);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline VF dec8(const uint8_t* p) { return MM(cvtepi32_ps)(MM(cvtepu8_epi32)(load_u8(p))); }
static inline void dec4(const uint8_t* p, VF& lo, VF& hi) {
  const auto v = MM(cvtepu8_epi32)(load_u8(p));
  lo = MM(cvtepi32_ps)(vand(v, MM(set1_epi32)(15)));
  hi = MM(cvtepi32_ps)(MM(srli_epi32)(v, 4));
}
static inline VF decbf16(const uint16_t* p) {
  return as_float(MM(slli_epi32)(MM(cvtepu16_epi32)(load_u16(p)), 16));  // bf16: a float's top half
}

// 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2, p of degree 6 (Cephes' coefficients). The clamp keeps
// n + 127 a normal exponent (1..254), which AVX2's vscale2n builds by hand.
static inline VF vexp(VF x) {
  x = vmin(vmax(x, vset1(-87.3f)), vset1(88.3f));
  const VF n = vround(vmul(x, vset1(1.44269504f)));
  VF r = vfnma(n, vset1(0.693359375f), x);  // ln2 in two parts (Cody-Waite): r keeps its low bits
  r = vfnma(n, vset1(-2.12194440e-4f), r);
  VF p = vset1(1.9875691500e-4f);
  p = vfma(p, r, vset1(1.3981999507e-3f));
  p = vfma(p, r, vset1(8.3334519073e-3f));
  p = vfma(p, r, vset1(4.1665795894e-2f));
  p = vfma(p, r, vset1(1.6666665459e-1f));
  p = vfma(p, r, vset1(5.0000001201e-1f));
  p = vfma(p, vmul(r, r), vadd(r, vset1(1.f)));
  return vscale2n(p, n);
}

}  // namespace q3k::Q3K_ISA

#undef MM
