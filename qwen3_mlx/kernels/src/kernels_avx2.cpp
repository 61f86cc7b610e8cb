// The kernels for AVX2 (this file's target flags: CMakeLists.txt).
#include "simd_avx2.h"
#include "kernels_body.h"

const q3k::Kernels& q3k::kernels_avx2() { return avx2::table(); }
