// The kernels for AVX-512 (this file's target flags: CMakeLists.txt).
#include "simd_avx512.h"
#include "kernels_body.h"

const q3k::Kernels& q3k::kernels_avx512() { return avx512::table(); }
