// The kernels compiled for generic (see CMakeLists.txt for this file's target flags).
// No target flags: the portable body.
#include "kernels_impl.h"

namespace q3k {
const Kernels& kernels_generic() { return generic::table(); }
}  // namespace q3k
