// The portable kernels: no target flags, any platform.
#include "simd_generic.h"
#include "kernels_body.h"

const q3k::Kernels& q3k::kernels_generic() { return generic::table(); }
