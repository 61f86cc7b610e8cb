// Scalar conversions and the scale readers shared by the kernel bodies. In an anonymous namespace:
// each translation unit, compiled for its own instruction set, keeps its own copy (an inline function
// with external linkage could be merged by the linker into a unit built for another set).
#pragma once

#include <cstdint>
#include <cstring>

namespace q3k {
namespace {

inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float f16_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, u;
  if (exp == 0x1F) {
    u = sign | 0x7F800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400) == 0);
    u = sign | (static_cast<uint32_t>(112 - e) << 23) | ((man & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct F32S {
  static float get(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
};
struct BF16S {
  static float get(const void* p, int64_t i) { return bf16_to_float(static_cast<const uint16_t*>(p)[i]); }
};
struct F16S {
  static float get(const void* p, int64_t i) { return f16_to_float(static_cast<const uint16_t*>(p)[i]); }
};

}  // namespace
}  // namespace q3k
