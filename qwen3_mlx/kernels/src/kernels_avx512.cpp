// The kernels compiled for avx512 (see CMakeLists.txt for this file's target flags).
#define Q3K_AVX512 1
#include "kernels_impl.h"

namespace q3k {
const Kernels& kernels_avx512() { return avx512::table(); }
}  // namespace q3k
