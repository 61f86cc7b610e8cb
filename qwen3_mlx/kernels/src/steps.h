// Serial pieces of the primitives, for the fused decode layers (decoder_layers.cpp): each computes exactly what
// its primitive computes for one position of one sequence (the same arithmetic, the same roundings), so a
// fused step is bit for bit the unfused one.
#pragma once

#include <cstdint>

namespace q3k {

// RMSNorm of `rows` rows of D floats (norm.cpp), on the calling thread; y may be x.
void rms_norm_rows(const float* x, const void* w, bool w_bf16, float* y, int64_t rows, int D, float eps);

// RoPE of H contiguous heads of D floats at position `pos` (rope.cpp), on the calling thread; out may be x.
void rope_heads(const float* x, const float* inv_freq, int H, int D, int64_t pos, float mscale, float* out);

// Decode attention of one query row per head (attention.cpp): q [H, D] contiguous, the first S keys and values
// of a [Hkv, >= S, D] cache at element strides kst / vst [h, s, d] -> out [H, D], on the pool.
void decode_attention_heads(const float* q, int H, int D, const float* k, const int64_t* kst, const float* v,
                            const int64_t* vst, int Hkv, int S, float scale, float* out);

}  // namespace q3k
