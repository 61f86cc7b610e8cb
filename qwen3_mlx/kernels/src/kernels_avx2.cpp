// The kernels compiled for avx2 (see CMakeLists.txt for this file's target flags).
#define Q3K_AVX2 1
#include "kernels_impl.h"

namespace q3k {
const Kernels& kernels_avx2() { return avx2::table(); }
}  // namespace q3k
