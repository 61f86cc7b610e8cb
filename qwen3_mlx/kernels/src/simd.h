// The vector layer that kernels_body.h is written against. kernels_<isa>.cpp includes one
// simd_<isa>.h (avx512, avx2, generic), then the body, and is compiled with that set's flags
// (CMakeLists.txt); kernels.cpp picks at run time the best set the CPU has. Each simd_<isa>.h defines,
// in namespace q3k::<isa>, static functions only: internal linkage, so the linker cannot merge one
// set's copy of a function into a file compiled for another.
//
//   VF, W                      a vector of W floats
//   vzero, vset1, vload, vstore     (unaligned)
//   vadd, vdiv, vfma(a, b, c) = a * b + c, vsum = the sum of the lanes
//   vexp                       exp of x clamped to [-87.3, 88.3] (x86: a polynomial, ~2 ulp)
//   dec8, decbf16              W uint8 / bfloat16 values -> floats
//   dec4(p, lo, hi)            W packed bytes -> 2W 4-bit values: lo the low nibbles (even elements),
//                              hi the high (odd); prepare_x puts the activations in that order
//   kLut4, lut4, lut4m, deq4   4-bit decode by table (simd_avx512.h); the defaults below say "none"
//   Q3K_ISA, Q3K_NAME          the namespace and the table's name
//   Q3K_MR x Q3K_NR            prefill GEMM tile: activation rows x weight rows (at most 6 x 4)
//   Q3K_FS_MR x Q3K_FS_NV      flash attention scores: query rows x vectors of keys (FS_NV * W divides
//                              kFlashKeys, 64)
//   Q3K_FV_MR x Q3K_FV_NV      flash attention P@V: query rows x vectors of value dims (D is padded
//                              to FV_NV * W)
// Each tile holds MR x NV (or NR) accumulators, NV loads and one broadcast or row load in registers,
// so its size is set by the set's register file (the lines beside each constant).
#pragma once

#include <cstdint>

namespace q3k {

// The defaults for a set without a table decode, hidden by the set's own names where it has one.
// Never called (kLut4 is false), only compiled.
constexpr bool kLut4 = false;
struct NoLut {};
static inline NoLut lut4(float, float) { return {}; }
static inline NoLut lut4m(const float*) { return {}; }
template <class V>
static inline void deq4(const uint8_t*, NoLut, V&, V&) {}

}  // namespace q3k
