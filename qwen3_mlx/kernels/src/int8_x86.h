// What the two VNNI layers share: the same instructions at two widths, written once for the width prefix
// Q3K_X86 of the float layer included before (simd_avx2.h or simd_avx512.h), as simd_x86.h does for floats.
// int8_<isa>.cpp defines VI and the operations whose names differ by more than the prefix, then this.
#pragma once

#define MM(op) Q3K_PASTE(Q3K_X86, _##op)

namespace q3k::Q3K_ISA {

static inline VI ibcast(int32_t v) { return MM(set1_epi32)(v); }
static inline VI iadd(VI a, VI b) { return MM(add_epi32)(a, b); }
static inline VI iround(VF v) { return MM(cvtps_epi32)(v); }  // half to even: the default rounding mode
static inline VF itof(VI v) { return MM(cvtepi32_ps)(v); }
static inline VI lo4(VI v) { return vand(v, MM(set1_epi8)(15)); }
static inline VI hi4(VI v) { return vand(MM(srli_epi16)(v, 4), MM(set1_epi8)(15)); }

}  // namespace q3k::Q3K_ISA

#undef MM
