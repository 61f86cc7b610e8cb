// The portable layer (simd.h): loops over 8 floats that the compiler vectorizes for whatever the target
// is (SSE2, NEON). No intrinsics and no target flags: it builds anywhere, and is the fallback on x86.
#pragma once

#include <cstring>

#include "simd.h"

#define Q3K_ISA generic
#define Q3K_NAME "generic"
// Small tiles, for the autovectorizer: each VF is two 128-bit registers (SSE2 has 16, NEON 32).
#define Q3K_MR 2     // GEMM: 2 x 4 accumulators + 4 weight loads + 1 activation load = 13 VF, 26 registers
#define Q3K_NR 4
#define Q3K_FS_MR 2  // flash scores: 2 x 2 + 2 key loads + 1 query broadcast = 7 VF, 14 registers
#define Q3K_FS_NV 2  // 2 x 8 = 16 keys, dividing the 64-key block
#define Q3K_FV_MR 2  // flash P@V: 2 x 2 + 2 value loads + 1 probability broadcast = 7 VF, 14 registers
#define Q3K_FV_NV 2  // 2 x 8 = 16: D is padded to a multiple of 16

namespace q3k::generic {

constexpr int W = 8;
struct VF {
  float v[W];
};
static inline VF vzero() { return VF{}; }
static inline VF vset1(float f) {
  VF r;
  for (int i = 0; i < W; ++i) r.v[i] = f;
  return r;
}
static inline VF vload(const float* p) {
  VF r;
  std::memcpy(r.v, p, sizeof(r.v));
  return r;
}
static inline void vstore(float* p, VF v) { std::memcpy(p, v.v, sizeof(v.v)); }
static inline VF vadd(VF a, VF b) {
  for (int i = 0; i < W; ++i) a.v[i] += b.v[i];
  return a;
}
static inline VF vdiv(VF a, VF b) {
  for (int i = 0; i < W; ++i) a.v[i] /= b.v[i];
  return a;
}
static inline VF vfma(VF a, VF b, VF c) {
  for (int i = 0; i < W; ++i) c.v[i] += a.v[i] * b.v[i];
  return c;
}
static inline float vsum(VF v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v.v[i];
  return s;
}
static inline VF vexp(VF x) {
  for (int i = 0; i < W; ++i) x.v[i] = __builtin_expf(x.v[i] < 88.3f ? (x.v[i] > -87.3f ? x.v[i] : -87.3f) : 88.3f);
  return x;
}
static inline VF dec8(const uint8_t* p) {
  VF r;
  for (int i = 0; i < W; ++i) r.v[i] = static_cast<float>(p[i]);
  return r;
}
static inline VF decbf16(const uint16_t* p) {
  VF r;
  for (int i = 0; i < W; ++i) {
    const uint32_t u = static_cast<uint32_t>(p[i]) << 16;
    std::memcpy(&r.v[i], &u, 4);
  }
  return r;
}
static inline void dec4(const uint8_t* p, VF& lo, VF& hi) {
  for (int i = 0; i < W; ++i) {
    lo.v[i] = static_cast<float>(p[i] & 15);
    hi.v[i] = static_cast<float>(p[i] >> 4);
  }
}

}  // namespace q3k::generic
