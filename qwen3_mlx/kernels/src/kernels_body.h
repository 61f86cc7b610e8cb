// The kernel bodies, written once against the vector layer of simd.h: each kernels_<isa>.cpp includes
// its simd_<isa>.h, then this, and is compiled with that instruction set's flags.
//
// Numerics: float32 accumulation throughout. Quantized rows use, per group of gs values,
//   sum_k x_k (s q_k + b) = s * sum_k x_k q_k + b * sum_k x_k
// (gemv), or expand the weight to floats first (gemm); both equal MLX's quantized_matmul to float32
// rounding.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.h"
#include "scalars.h"

namespace q3k::Q3K_ISA {
namespace {

// Bytes ahead that quantized decode prefetches (twice that for 8-bit): measured 1.2-1.8x on weights
// streamed from memory (4-bit lm_head 8.8 -> 15.5 GB/s on 2 threads). Float rows, a plain stream
// already near the read test, are left to the hardware prefetcher.
constexpr int kPrefetch = 1024;
constexpr int kMaxGroups = 1024;  // per row, staged on the stack (K up to 32768 at group size 32)

inline float* out_row(const MatArgs& a, int m) {
  return a.y + static_cast<int64_t>(a.yrows ? a.yrows[m] : m) * a.ldy;
}

// ---- decode: each weight row is read once and decoded in registers for up to MR activation rows ----

// 4- or 8-bit rows. GS (the group size) is a template argument so the chunk loops unroll and no integer
// arithmetic is left in them: scalar ops share ports with the vector decode, which is what bounds this kernel.
template <int MR, class S, int GS, int BITS>
void gemv_q(const MatArgs& a, int n0, int n1, int m0) {
  constexpr int C = GS / (2 * W);  // chunks of 2W values per group
  constexpr bool by_table = BITS == 4 && kLut4;
  const int G = a.K / GS;
  const float* xb[MR];
  for (int m = 0; m < MR; ++m) xb[m] = a.x + (m0 + m) * a.ldx;
  const float* xs = a.xsum ? a.xsum + static_cast<int64_t>(m0) * G : nullptr;
  for (int n = n0; n < n1; ++n) {
    const uint8_t* wr = static_cast<const uint8_t*>(a.w) + n * a.w_row_bytes;
    const int64_t sg = static_cast<int64_t>(n) * G;
    VF acc0[MR], acc1[MR];
    float bsum[MR];
    for (int m = 0; m < MR; ++m) acc0[m] = vzero(), acc1[m] = vzero(), bsum[m] = 0.f;
    // The row's scales and biases as float32 first: a broadcast from memory costs only a load, where
    // one from a register (after a bf16/f16 conversion) takes the shuffle port the decode needs.
    float sb[2 * kMaxGroups];
    const bool staged = by_table && G <= kMaxGroups;
    if (staged)
      for (int g = 0; g < G; ++g)
        sb[2 * g] = S::get(a.scales, sg + g), sb[2 * g + 1] = a.biases ? S::get(a.biases, sg + g) : 0.f;
    for (int g = 0; g < G; ++g) {
      const uint8_t* wg = wr + g * (GS * BITS / 8);
      __builtin_prefetch(wg + kPrefetch * BITS / 4);
      if constexpr (by_table) {
        // Dequantize (MLX's s * q + b) and accumulate x * w directly.
        const auto lut = staged ? lut4m(sb + 2 * g)
                                : lut4(S::get(a.scales, sg + g), a.biases ? S::get(a.biases, sg + g) : 0.f);
        for (int c = 0; c < C; ++c) {
          VF lo, hi;
          deq4(wg + c * W, lut, lo, hi);
          for (int m = 0; m < MR; ++m) {
            const float* xr = xb[m] + g * GS + c * 2 * W;
            acc0[m] = vfma(lo, vload(xr), acc0[m]);
            acc1[m] = vfma(hi, vload(xr + W), acc1[m]);
          }
        }
      } else {
        // s * sum(x q) + b * sum(x): the scale is applied once per group.
        VF g0[MR], g1[MR];
        for (int m = 0; m < MR; ++m) g0[m] = vzero(), g1[m] = vzero();
        for (int c = 0; c < C; ++c) {
          VF lo, hi;
          if constexpr (BITS == 4) {
            dec4(wg + c * W, lo, hi);
          } else {
            lo = dec8(wg + c * 2 * W), hi = dec8(wg + c * 2 * W + W);
          }
          for (int m = 0; m < MR; ++m) {
            const float* xr = xb[m] + g * GS + c * 2 * W;
            g0[m] = vfma(lo, vload(xr), g0[m]);
            g1[m] = vfma(hi, vload(xr + W), g1[m]);
          }
        }
        const VF sv = vset1(S::get(a.scales, sg + g));
        for (int m = 0; m < MR; ++m) acc0[m] = vfma(sv, vadd(g0[m], g1[m]), acc0[m]);
        if (a.biases) {
          const float bi = S::get(a.biases, sg + g);
          for (int m = 0; m < MR; ++m) bsum[m] += bi * xs[m * G + g];
        }
      }
    }
    for (int m = 0; m < MR; ++m) out_row(a, m0 + m)[n] = vsum(BITS == 4 ? vadd(acc0[m], acc1[m]) : acc0[m]) + bsum[m];
  }
}

// Float weights; K need not be a multiple of the vector width.
template <int MR, bool BF16>
void gemv_float(const MatArgs& a, int n0, int n1, int m0) {
  const int K = a.K, Kv = K - K % (2 * W);
  for (int n = n0; n < n1; ++n) {
    const char* wr = static_cast<const char*>(a.w) + n * a.w_row_bytes;
    const float* wf = reinterpret_cast<const float*>(wr);
    const uint16_t* wb = reinterpret_cast<const uint16_t*>(wr);
    VF g0[MR], g1[MR];
    for (int m = 0; m < MR; ++m) g0[m] = vzero(), g1[m] = vzero();
    for (int k = 0; k < Kv; k += 2 * W) {
      VF w0, w1;
      if constexpr (BF16) {
        w0 = decbf16(wb + k), w1 = decbf16(wb + k + W);
      } else {
        w0 = vload(wf + k), w1 = vload(wf + k + W);
      }
      for (int m = 0; m < MR; ++m) {
        const float* xr = a.x + (m0 + m) * a.ldx + k;
        g0[m] = vfma(w0, vload(xr), g0[m]);
        g1[m] = vfma(w1, vload(xr + W), g1[m]);
      }
    }
    for (int m = 0; m < MR; ++m) {
      const float* xr = a.x + (m0 + m) * a.ldx;
      float s = vsum(vadd(g0[m], g1[m]));
      for (int k = Kv; k < K; ++k) s += xr[k] * (BF16 ? bf16_to_float(wb[k]) : wf[k]);
      out_row(a, m0 + m)[n] = s;
    }
  }
}

template <int MR, class S, int GS>
void gemv_quant(const MatArgs& a, int n0, int n1, int m0) {
  if (a.wt == WType::Q4) return gemv_q<MR, S, GS, 4>(a, n0, n1, m0);
  return gemv_q<MR, S, GS, 8>(a, n0, n1, m0);
}

template <int MR, class S>
void gemv_mr(const MatArgs& a, int n0, int n1, int m0) {
  switch (a.wt) {
    case WType::Q4:
    case WType::Q8:
      if (a.gs == 32) return gemv_quant<MR, S, 32>(a, n0, n1, m0);
      if (a.gs == 64) return gemv_quant<MR, S, 64>(a, n0, n1, m0);
      return gemv_quant<MR, S, 128>(a, n0, n1, m0);
    case WType::BF16: return gemv_float<MR, true>(a, n0, n1, m0);
    case WType::F32: return gemv_float<MR, false>(a, n0, n1, m0);
  }
}

template <class S>
void gemv_s(const MatArgs& a, int n0, int n1) {
  // Four activation rows per pass over the weight rows (these rows stay in L1 between passes).
  int m = 0;
  for (; m + 4 <= a.M; m += 4) gemv_mr<4, S>(a, n0, n1, m);
  switch (a.M - m) {
    case 3: gemv_mr<3, S>(a, n0, n1, m); break;
    case 2: gemv_mr<2, S>(a, n0, n1, m); break;
    case 1: gemv_mr<1, S>(a, n0, n1, m); break;
    default: break;
  }
}

void gemv(const MatArgs& a, int n0, int n1) {
  switch (a.st) {
    case SType::F32: return gemv_s<F32S>(a, n0, n1);
    case SType::BF16: return gemv_s<BF16S>(a, n0, n1);
    case SType::F16: return gemv_s<F16S>(a, n0, n1);
  }
}

// ---- prefill: expand a block of weight rows to floats once, then an MR x NR register-blocked kernel ----

template <class S>
void expand_rows(const MatArgs& a, int n0, int n1, float* tile) {
  const int K = a.K, gs = a.gs, G = gs > 0 ? K / gs : 0;
  for (int n = n0; n < n1; ++n) {
    const uint8_t* wr = static_cast<const uint8_t*>(a.w) + n * a.w_row_bytes;
    float* t = tile + static_cast<int64_t>(n - n0) * K;
    if (a.wt == WType::BF16) {
      const uint16_t* wb = reinterpret_cast<const uint16_t*>(wr);
      int k = 0;
      for (; k + W <= K; k += W) vstore(t + k, decbf16(wb + k));
      for (; k < K; ++k) t[k] = bf16_to_float(wb[k]);
      continue;
    }
    const int64_t sg = static_cast<int64_t>(n) * G;
    for (int g = 0; g < G; ++g) {
      const float sc = S::get(a.scales, sg + g), bi = a.biases ? S::get(a.biases, sg + g) : 0.f;
      if (kLut4 && a.wt == WType::Q4) {
        const auto lut = lut4(sc, bi);
        for (int k = g * gs; k < (g + 1) * gs; k += 2 * W) {
          VF lo, hi;
          deq4(wr + (k >> 1), lut, lo, hi);
          vstore(t + k, lo);
          vstore(t + k + W, hi);
        }
        continue;
      }
      const VF s = vset1(sc), b = vset1(bi);
      for (int k = g * gs; k < (g + 1) * gs; k += 2 * W) {
        VF lo, hi;
        if (a.wt == WType::Q4) {
          dec4(wr + (k >> 1), lo, hi);
        } else {
          lo = dec8(wr + k), hi = dec8(wr + k + W);
        }
        vstore(t + k, vfma(lo, s, b));
        vstore(t + k + W, vfma(hi, s, b));
      }
    }
  }
}

// out[m][j] = sum_k x[m][k] t[j][k] for an MR x NR block; K tails (float weights) done in scalar.
template <int MR, int NR>
void micro(const float* x, int64_t ldx, const float* t, int64_t ldt, int K, float* const* out, int j0) {
  const int Kv = K - K % W;
  VF acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) acc[m][j] = vzero();
  for (int k = 0; k < Kv; k += W) {
    VF tv[NR];
    for (int j = 0; j < NR; ++j) tv[j] = vload(t + j * ldt + k);
    for (int m = 0; m < MR; ++m) {
      const VF xv = vload(x + m * ldx + k);
      for (int j = 0; j < NR; ++j) acc[m][j] = vfma(xv, tv[j], acc[m][j]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) {
      float s = vsum(acc[m][j]);
      for (int k = Kv; k < K; ++k) s += x[m * ldx + k] * t[j * ldt + k];
      out[m][j0 + j] = s;
    }
}

using MicroFn = void (*)(const float*, int64_t, const float*, int64_t, int, float* const*, int);

template <int MR>
MicroFn pick_nr(int nr) {
  switch (nr) {
    case 1: return &micro<MR, 1>;
    case 2: if constexpr (Q3K_NR >= 2) return &micro<MR, 2>; break;
    case 3: if constexpr (Q3K_NR >= 3) return &micro<MR, 3>; break;
    case 4: if constexpr (Q3K_NR >= 4) return &micro<MR, 4>; break;
  }
  return nullptr;
}

// Plain switches, not std containers: every function here has internal linkage, so no inline
// function compiled with this file's instruction set can be picked by the linker for another file.
MicroFn pick_micro(int mr, int nr) {
  switch (mr) {
    case 1: return pick_nr<1>(nr);
    case 2: if constexpr (Q3K_MR >= 2) return pick_nr<2>(nr); break;
    case 3: if constexpr (Q3K_MR >= 3) return pick_nr<3>(nr); break;
    case 4: if constexpr (Q3K_MR >= 4) return pick_nr<4>(nr); break;
    case 5: if constexpr (Q3K_MR >= 5) return pick_nr<5>(nr); break;
    case 6: if constexpr (Q3K_MR >= 6) return pick_nr<6>(nr); break;
  }
  return nullptr;
}

inline int imin(int a, int b) { return a < b ? a : b; }

void expand(const MatArgs& a, int n0, int n1, float* tile) {
  switch (a.st) {
    case SType::F32: return expand_rows<F32S>(a, n0, n1, tile);
    case SType::BF16: return expand_rows<BF16S>(a, n0, n1, tile);
    case SType::F16: return expand_rows<F16S>(a, n0, n1, tile);
  }
}

void gemm(const MatArgs& a, int n0, int n1, float* tile) {
  const float* t = tile;
  int64_t ldt = a.K;
  if (a.wt == WType::F32) {
    t = reinterpret_cast<const float*>(static_cast<const char*>(a.w) + n0 * a.w_row_bytes);
    ldt = a.w_row_bytes / 4;
  } else {
    expand(a, n0, n1, tile);
  }
  const int nt = n1 - n0;
  for (int m0 = 0; m0 < a.M; m0 += Q3K_MR) {
    const int mr = imin(Q3K_MR, a.M - m0);
    float* rows[Q3K_MR];
    for (int m = 0; m < mr; ++m) rows[m] = out_row(a, m0 + m) + n0;
    for (int j = 0; j < nt; j += Q3K_NR) {
      const int nr = imin(Q3K_NR, nt - j);
      pick_micro(mr, nr)(a.x + m0 * a.ldx, a.ldx, t + j * ldt, ldt, a.K, rows, j);
    }
  }
}

// ---- decode attention ----

inline float dot(const float* a, const float* b, int D) {
  VF acc0 = vzero(), acc1 = vzero();
  int d = 0;
  for (; d + 2 * W <= D; d += 2 * W) {
    acc0 = vfma(vload(a + d), vload(b + d), acc0);
    acc1 = vfma(vload(a + d + W), vload(b + d + W), acc1);
  }
  for (; d + W <= D; d += W) acc0 = vfma(vload(a + d), vload(b + d), acc0);
  float s = vsum(vadd(acc0, acc1));
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}

void attend(const AttnArgs& a) {
  const int D = a.D, S = a.S;
  // Scores: each key row is read once for all `rep` query heads.
  for (int s = 0; s < S; ++s) {
    const float* kr = a.k + s * a.ks;
    for (int j = 0; j < a.rep; ++j) a.scores[j * S + s] = a.scale * dot(a.q + j * D, kr, D);
  }
  // Softmax in float32 (max subtracted), normalised at the end.
  float inv[16];
  for (int j = 0; j < a.rep; ++j) {
    float* sc = a.scores + j * S;
    float mx = sc[0];
    for (int s = 1; s < S; ++s) mx = sc[s] > mx ? sc[s] : mx;
    float sum = 0.f;
    for (int s = 0; s < S; ++s) sum += (sc[s] = __builtin_expf(sc[s] - mx));  // libm expf, no inline copy
    inv[j] = a.row_sum ? 1.f : 1.f / sum;
    if (a.row_sum) a.row_max[j] = mx, a.row_sum[j] = sum;
    for (int d = 0; d < D; ++d) a.out[j * D + d] = 0.f;
  }
  // out += p_s * v_s: each value row is read once for all query heads.
  for (int s = 0; s < S; ++s) {
    const float* vr = a.v + s * a.vs;
    for (int j = 0; j < a.rep; ++j) {
      const float p = a.scores[j * S + s];
      float* o = a.out + j * D;
      int d = 0;
      const VF pv = vset1(p);
      for (; d + W <= D; d += W) vstore(o + d, vfma(pv, vload(vr + d), vload(o + d)));
      for (; d < D; ++d) o[d] += p * vr[d];
    }
  }
  for (int j = 0; j < a.rep; ++j)
    for (int d = 0; d < D; ++d) a.out[j * D + d] *= inv[j];
}

// ---- prefill attention: blocks of kFlashKeys keys with an online softmax (no score matrix) ----

static_assert(kFlashKeys % (Q3K_FS_NV * W) == 0, "a key block is whole score micro-kernels");

// c[m][0..n) = (ACC ? c[m][..] : 0) + sum_k a[m][k] b[k][..] for MR rows, n a multiple of NV * W: each
// a[m][k] broadcast against NV vectors of b's row k. Scores: q against the transposed key block; P@V:
// the block's probabilities against its value rows.
template <int MR, int NV, bool ACC>
void flash_tile(const float* a, int64_t lda, const float* b, int64_t ldb, int K, float* c, int64_t ldc, int n) {
  for (int j0 = 0; j0 < n; j0 += NV * W) {
    VF acc[MR][NV];
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v) acc[m][v] = ACC ? vload(c + m * ldc + j0 + v * W) : vzero();
    for (int k = 0; k < K; ++k) {
      VF bv[NV];
      for (int v = 0; v < NV; ++v) bv[v] = vload(b + k * ldb + j0 + v * W);
      for (int m = 0; m < MR; ++m) {
        const VF av = vset1(a[m * lda + k]);
        for (int v = 0; v < NV; ++v) acc[m][v] = vfma(av, bv[v], acc[m][v]);
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v) vstore(c + m * ldc + j0 + v * W, acc[m][v]);
  }
}

// Rows [r0, R) in groups of N, the tail in one smaller group.
template <int N, template <int> class Fn, class... A>
void rows_by(int r0, int R, A... args) {
  int r = r0;
  for (; r + N <= R; r += N) Fn<N>::run(r, args...);
  if constexpr (N > 1) {
    if (r < R) rows_by<N - 1, Fn>(r, R, args...);
  }
}

template <int MR>
struct ScoresRows {
  static void run(int r, const FlashArgs* a) {
    flash_tile<MR, Q3K_FS_NV, false>(a->q + static_cast<int64_t>(r) * a->D, a->D, a->kt, kFlashKeys, a->D,
                                     a->s + static_cast<int64_t>(r) * kFlashKeys, kFlashKeys, kFlashKeys);
  }
};
template <int MR>
struct PVRows {
  static void run(int r, const FlashArgs* a, int bk) {
    flash_tile<MR, Q3K_FV_NV, true>(a->s + static_cast<int64_t>(r) * kFlashKeys, kFlashKeys, a->vp, a->Dp, bk,
                                    a->o + static_cast<int64_t>(r) * a->Dp, a->Dp, a->Dp);
  }
};

// Keys [c0, c0 + bk) transposed to kt [D][kFlashKeys] and values padded to vp [kFlashKeys][Dp], zeros past bk.
void stage_float(const FlashArgs& a, int c0, int bk) {
  const int D = a.D, Dp = a.Dp;
  for (int c = 0; c < kFlashKeys; ++c) {
    const float* kr = a.k + static_cast<int64_t>(c0 + c) * a.ks;
    const float* vr = a.v + static_cast<int64_t>(c0 + c) * a.vs;
    float* vo = a.vp + static_cast<int64_t>(c) * Dp;
    if (c < bk) {
      for (int d = 0; d < D; ++d) a.kt[d * kFlashKeys + c] = kr[d * a.kd];
      for (int d = 0; d < D; ++d) vo[d] = vr[d * a.vd];
    } else {
      for (int d = 0; d < D; ++d) a.kt[d * kFlashKeys + c] = 0.f;
      for (int d = 0; d < D; ++d) vo[d] = 0.f;
    }
    for (int d = D; d < Dp; ++d) vo[d] = 0.f;
  }
}

// The same from a quantized cache: each block of rows expanded once, then laid out as above.
void stage_quantized(const FlashArgs& a, int c0, int bk) {
  const int D = a.D, Dp = a.Dp;
  const bool k4 = a.kq->wt == WType::Q4, v4 = a.vq->wt == WType::Q4;
  expand(*a.kq, c0, c0 + bk, a.stage);
  for (int c = 0; c < kFlashKeys; ++c) {
    const float* t = a.stage + static_cast<int64_t>(c) * D;
    for (int d = 0; d < D; ++d) a.kt[d * kFlashKeys + c] = c < bk ? t[expanded_pos(d, k4, W)] : 0.f;
  }
  expand(*a.vq, c0, c0 + bk, a.stage);
  for (int c = 0; c < kFlashKeys; ++c) {
    const float* t = a.stage + static_cast<int64_t>(c) * D;
    float* vo = a.vp + static_cast<int64_t>(c) * Dp;
    for (int d = 0; d < D; ++d) vo[d] = c < bk ? t[expanded_pos(d, v4, W)] : 0.f;
    for (int d = D; d < Dp; ++d) vo[d] = 0.f;
  }
}

void flash(const FlashArgs& a) {
  const int R = a.R, D = a.D, Dp = a.Dp;
  // The last row (the block's last position) sees the most keys.
  const int nkeys = a.causal ? (a.first_limit + a.nq < a.S ? a.first_limit + a.nq : a.S) : a.S;
  for (int r = 0; r < R; ++r) {
    a.m[r] = -INFINITY;
    a.l[r] = 0.f;
    for (int d = 0; d < Dp; ++d) a.o[static_cast<int64_t>(r) * Dp + d] = 0.f;
  }
  for (int c0 = 0; c0 < nkeys; c0 += kFlashKeys) {
    const int bk = nkeys - c0 < kFlashKeys ? nkeys - c0 : kFlashKeys;
    // Keys transposed to [D][kFlashKeys] and values padded to [kFlashKeys][Dp]: read once per block,
    // by their strides (a cache slice in place), reused by all R rows. This staging is the one place
    // that reads the cache, so a quantized cache dequantizes a block here (no float copy of the cache).
    if (a.kq) {
      stage_quantized(a, c0, bk);
    } else {
      stage_float(a, c0, bk);
    }
    rows_by<Q3K_FS_MR, ScoresRows>(0, R, &a);
    for (int r = 0; r < R; ++r) {
      float* sr = a.s + static_cast<int64_t>(r) * kFlashKeys;
      // Keys [c0, c0 + lim] of this block are visible to row r.
      int lim = bk - 1;
      if (a.causal) {
        const int last = a.first_limit + r % a.nq - c0;
        lim = last < lim ? last : lim;
      }
      if (lim < 0) {
        for (int c = 0; c < kFlashKeys; ++c) sr[c] = 0.f;
        continue;
      }
      float mx = sr[0];
      for (int c = 1; c <= lim; ++c) mx = sr[c] > mx ? sr[c] : mx;
      const float m_new = mx > a.m[r] ? mx : a.m[r];
      const float alpha = std::exp(a.m[r] - m_new);  // 0 on the first block (m = -inf)
      const VF neg_m = vset1(-m_new);
      VF acc = vzero();
      for (int c = 0; c < kFlashKeys; c += W) vstore(sr + c, vexp(vadd(vload(sr + c), neg_m)));
      for (int c = lim + 1; c < kFlashKeys; ++c) sr[c] = 0.f;
      for (int c = 0; c < kFlashKeys; c += W) acc = vadd(acc, vload(sr + c));
      a.l[r] = a.l[r] * alpha + vsum(acc);
      a.m[r] = m_new;
      if (alpha != 1.f) {
        float* orow = a.o + static_cast<int64_t>(r) * Dp;
        const VF av = vset1(alpha);
        for (int d = 0; d < Dp; d += W) vstore(orow + d, vfma(vload(orow + d), av, vzero()));
      }
    }
    rows_by<Q3K_FV_MR, PVRows>(0, R, &a, bk);
  }
  for (int r = 0; r < R; ++r) {
    const float inv = 1.f / a.l[r];
    const float* orow = a.o + static_cast<int64_t>(r) * Dp;
    float* y = a.out + static_cast<int64_t>(r / a.nq) * a.out_head + static_cast<int64_t>(r % a.nq) * D;
    for (int d = 0; d < D; ++d) y[d] = orow[d] * inv;
  }
}

// ---- SwiGLU: silu(g) * u = g * u / (1 + exp(-g)) ----

void swiglu(const float* g, const float* u, float* out, int64_t n) {
  const VF one = vset1(1.f), zero = vzero();
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const VF gv = vload(g + i);
    const VF e = vexp(vfma(gv, vset1(-1.f), zero));
    vstore(out + i, vdiv(vfma(gv, vload(u + i), zero), vadd(one, e)));
  }
  for (; i < n; ++i) out[i] = g[i] * u[i] / (1.f + __builtin_expf(-g[i]));
}

// ---- Gated delta rule: token by token, the head's state [Dk, Dv] (64 KB at 128 x 128) staying in cache ----

void delta_rule(const DeltaArgs& a) {
  const int Dk = a.Dk, Dv = a.Dv;
  float* S = a.S;
  float* kv = a.kv;
  const VF zero = vzero();
  for (int t = 0; t < a.L; ++t) {
    const float* q = a.q + t * a.qs;
    const float* k = a.k + t * a.ks;
    const float* v = a.v + t * a.vs;
    float* o = a.out + t * a.os;
    const float e = __builtin_expf(a.g[t * a.gst]), b = a.beta[t * a.bst];
    // kv = S^T k (before the decay: S' = e S, so S'^T k = e kv)
    for (int j = 0; j < Dv; ++j) kv[j] = 0.f;
    for (int i = 0; i < Dk; ++i) {
      const float* Si = S + static_cast<int64_t>(i) * Dv;
      const VF ki = vset1(k[i]);
      int j = 0;
      for (; j + W <= Dv; j += W) vstore(kv + j, vfma(vload(Si + j), ki, vload(kv + j)));
      for (; j < Dv; ++j) kv[j] += Si[j] * k[i];
    }
    for (int j = 0; j < Dv; ++j) kv[j] = (v[j] - e * kv[j]) * b;  // the delta written for k
    for (int j = 0; j < Dv; ++j) o[j] = 0.f;
    const VF ev = vset1(e);
    for (int i = 0; i < Dk; ++i) {
      float* Si = S + static_cast<int64_t>(i) * Dv;
      const VF ki = vset1(k[i]), qi = vset1(q[i]);
      int j = 0;
      for (; j + W <= Dv; j += W) {
        const VF sv = vfma(vload(kv + j), ki, vfma(vload(Si + j), ev, zero));
        vstore(Si + j, sv);
        vstore(o + j, vfma(sv, qi, vload(o + j)));
      }
      for (; j < Dv; ++j) {
        const float sv = e * Si[j] + k[i] * kv[j];
        Si[j] = sv;
        o[j] += sv * q[i];
      }
    }
  }
}

}  // namespace

const Kernels& table() {
  static const Kernels k{Q3K_NAME, W, !kLut4, &gemv, &gemm, &expand, Q3K_FV_NV * W, &attend, &flash, &swiglu,
                         &delta_rule};
  return k;
}

}  // namespace q3k::Q3K_ISA
