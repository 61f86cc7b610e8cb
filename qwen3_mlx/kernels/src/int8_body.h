// The integer kernels' body (the arithmetic: int8.h), written once against the float layer of simd.h
// and a small integer layer (int8_<isa>.cpp, int8_x86.h) included before this:
//   VI                       W 32-bit lanes (4 * W bytes, one chunk)
//   iload(p), iload_part(p, n)   a chunk; its first n bytes (n a multiple of 16), zeros after
//   lo4, hi4                 the low / high nibble of each byte
//   dot4(acc, u, s)          acc + in each lane the sum of 4 products of unsigned u bytes and signed s bytes
//   itof                     lanes to float (exact: a lane's sum stays below 2^24)
//   permute(idx, v)          v's lanes picked by idx
//   ibcast, istore, iadd     a dword broadcast, a store, lane sums
//   iround(v)                floats to int32, rounded half to even
//   split_even_odd(a, b, ev, od)   the even and the odd lanes of a then b (2W values) apart
//   store_codes(p, v)        W int32 lanes (each within int8) as W bytes
//   vabs                     |v|
//   Q3K_I8_MR                activation rows per pass (accumulators in registers)
// The source is compiled with -ffp-contract=off: every product and sum is rounded on its own, as the
// numpy reference rounds it.
#pragma once

#include <cstdint>

#include "driver.h"
#include "int8.h"
#include "scalars.h"

namespace q3k::Q3K_ISA {
namespace {

constexpr int kPrefetch8 = 1024;  // bytes ahead (twice for 8-bit), as the float decode

inline float* row_out(const MatArgs& a, int m) { return a.y + static_cast<int64_t>(a.yrows ? a.yrows[m] : m) * a.ldy; }

// Lane l of a chunk belongs to group g0 + l / LPG (LPG lanes a group); a group spanning whole chunks
// broadcasts one scale.
template <int LPG>
inline VF lane_scales(const float* s, int g0, VI idx) {
  if constexpr (LPG >= W) {
    (void)idx;
    return vset1(s[g0]);
  } else {
    return permute(idx, vload(s + g0));
  }
}

// Rows m0 .. m0 + MR of the output for weight rows [n0, n1); `sc` holds the rows' scales as floats
// ([n1 - n0][ldsc], zero-padded past G, as the activations' d are); `add`: the output already holds the
// bias part.
template <int MR, int BITS, int GS>
void rows_pass(const MatArgs& a, int n0, int n1, int m0, const float* sc, int64_t ldsc, bool add) {
  constexpr int CB = 4 * W;                // chunk bytes
  constexpr int C = CB * (8 / BITS);       // chunk values
  constexpr int LPG = GS / (32 / BITS);    // lanes a group
  const int64_t row_bytes = static_cast<int64_t>(a.K) * BITS / 8;
  const int nfull = static_cast<int>(row_bytes / CB), tail = static_cast<int>(row_bytes % CB);
  const int nchunks = nfull + (tail ? 1 : 0);
  alignas(64) int32_t idx_l[W];
  for (int l = 0; l < W; ++l) idx_l[l] = LPG >= W ? 0 : l / LPG;
  const VI idx = iload(idx_l);
  const int8_t* xc[MR];
  const float* d[MR];
  for (int m = 0; m < MR; ++m) xc[m] = a.x8.codes + (m0 + m) * a.x8.ld, d[m] = a.x8.d + (m0 + m) * a.x8.ldg;
  for (int n = n0; n < n1; ++n) {
    const uint8_t* wr = static_cast<const uint8_t*>(a.w) + n * a.w_row_bytes;
    const float* s = sc + (n - n0) * ldsc;
    VF acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = vzero();
    for (int j = 0; j < nchunks; ++j) {
      __builtin_prefetch(wr + j * CB + kPrefetch8 * BITS / 4);
      const VI w = j < nfull ? iload(wr + j * CB) : iload_part(wr + j * CB, tail);
      const int g0 = j * C / GS;
      const VF sv = lane_scales<LPG>(s, g0, idx);
      if constexpr (BITS == 4) {
        const VI lo = lo4(w), hi = hi4(w);
        for (int m = 0; m < MR; ++m) {
          const int8_t* x = xc[m] + j * C;
          const VI t = dot4(dot4(izero(), lo, iload(x)), hi, iload(x + CB));
          acc[m] = vadd(acc[m], vmul(itof(t), vmul(sv, lane_scales<LPG>(d[m], g0, idx))));
        }
      } else {
        for (int m = 0; m < MR; ++m) {
          const VI t = dot4(izero(), w, iload(xc[m] + j * C));
          acc[m] = vadd(acc[m], vmul(itof(t), vmul(sv, lane_scales<LPG>(d[m], g0, idx))));
        }
      }
    }
    for (int m = 0; m < MR; ++m) {
      float* y = row_out(a, m0 + m) + n;
      const float v = vsum(acc[m]);
      *y = add ? v + *y : v;
    }
  }
}

template <int BITS, int GS>
void passes(const MatArgs& a, int n0, int n1, const float* sc, int64_t ldsc, bool add) {
  int m = 0;
  for (; m + Q3K_I8_MR <= a.M; m += Q3K_I8_MR) rows_pass<Q3K_I8_MR, BITS, GS>(a, n0, n1, m, sc, ldsc, add);
  // the last rows one pass each size down (a row's arithmetic does not depend on its pass)
  if constexpr (Q3K_I8_MR > 4) {
    if (a.M - m >= 4) rows_pass<4, BITS, GS>(a, n0, n1, m, sc, ldsc, add), m += 4;
  }
  if (a.M - m >= 2) rows_pass<2, BITS, GS>(a, n0, n1, m, sc, ldsc, add), m += 2;
  if (a.M - m >= 1) rows_pass<1, BITS, GS>(a, n0, n1, m, sc, ldsc, add);
}

// The scales of weight rows [n0, n1) as floats, scale (n, g) at sc[(n - n0) * rs + g * cs] (row-major for the
// decode, transposed for the prefill), and the biases transposed (bt[g * ldb + n - n0]) when there are any.
template <class S>
void stage_as(const MatArgs& a, int n0, int n1, float* sc, int64_t rs, int64_t cs, float* bt, int64_t ldb) {
  const int G = a.K / a.gs;
  for (int n = n0; n < n1; ++n) {
    const int64_t sg = static_cast<int64_t>(n) * G;
    for (int g = 0; g < G; ++g) {
      if (sc) sc[(n - n0) * rs + g * cs] = S::get(a.scales, sg + g);
      if (bt) bt[g * ldb + (n - n0)] = S::get(a.biases, sg + g);
    }
  }
}

void stage(const MatArgs& a, int n0, int n1, float* sc, int64_t rs, int64_t cs, float* bt, int64_t ldb) {
  switch (a.st) {
    case SType::F32: return stage_as<F32S>(a, n0, n1, sc, rs, cs, bt, ldb);
    case SType::BF16: return stage_as<BF16S>(a, n0, n1, sc, rs, cs, bt, ldb);
    case SType::F16: return stage_as<F16S>(a, n0, n1, sc, rs, cs, bt, ldb);
  }
}

// The bias part, sum over g in order of b_g * xs_g, into the output: output rows in the lanes.
void bias_part(const MatArgs& a, int n0, int n1, const float* bt, int64_t ldb) {
  const int G = a.K / a.gs, nb = n1 - n0;
  for (int m = 0; m < a.M; ++m) {
    const float* xs = a.x8.xs + m * a.x8.ldg;
    float* y = row_out(a, m) + n0;
    for (int r = 0; r < nb; r += W) {
      VF acc = vzero();
      for (int g = 0; g < G; ++g) acc = vadd(acc, vmul(vload(bt + g * ldb + r), vset1(xs[g])));
      alignas(64) float tmp[W];
      vstore(tmp, acc);
      for (int i = 0; i < W && r + i < nb; ++i) y[r + i] = tmp[i];
    }
  }
}

template <int BITS>
void gemv_bits(const MatArgs& a, int n0, int n1, const float* sc, int64_t ldsc, bool add) {
  if (a.gs == 32) return passes<BITS, 32>(a, n0, n1, sc, ldsc, add);
  if (a.gs == 64) return passes<BITS, 64>(a, n0, n1, sc, ldsc, add);
  return passes<BITS, 128>(a, n0, n1, sc, ldsc, add);
}

// Zeroed scratch of n floats (the padding the kernels read past the real values).
inline float* zeroed(Scratch& s, int64_t n) {
  float* p = s.get(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) p[i] = 0.f;
  return p;
}

// The decode's row-major scales: each row's G values converted a vector at a time (a scalar conversion per
// value was a quarter of a decode product with its weights in cache), then its W zeros of padding.
void stage_scale_rows(const MatArgs& a, int n0, int n1, float* sc, int64_t ldsc) {
  const int G = a.K / a.gs;
  for (int n = n0; n < n1; ++n) {
    const int64_t sg = static_cast<int64_t>(n) * G;
    float* row = sc + (n - n0) * ldsc;
    int g = 0;
    if (a.st == SType::BF16) {
      for (; g + W <= G; g += W) vstore(row + g, decbf16(static_cast<const uint16_t*>(a.scales) + sg + g));
    } else if (a.st == SType::F32) {
      for (; g + W <= G; g += W) vstore(row + g, vload(static_cast<const float*>(a.scales) + sg + g));
    }
    for (; g < G; ++g)
      row[g] = a.st == SType::BF16 ? BF16S::get(a.scales, sg + g)
                                   : a.st == SType::F16 ? F16S::get(a.scales, sg + g) : F32S::get(a.scales, sg + g);
    for (int64_t i = G; i < ldsc; ++i) row[i] = 0.f;
  }
}

void gemv8(const MatArgs& a, int n0, int n1) {
  thread_local Scratch scales, biases;
  const int G = a.K / a.gs, nb = n1 - n0;
  const int64_t ldsc = G + W, ldb = (nb + W - 1) / W * W;  // rows padded for lane_scales, columns to vectors
  float* sc = scales.get(static_cast<size_t>(nb * ldsc));
  stage_scale_rows(a, n0, n1, sc, ldsc);
  if (a.biases) {
    float* bt = zeroed(biases, G * ldb);
    stage(a, n0, n1, nullptr, 0, 0, bt, ldb);
    bias_part(a, n0, n1, bt, ldb);
  }
  if (a.wt == WType::Q4) return gemv_bits<4>(a, n0, n1, sc, ldsc, a.biases != nullptr);
  return gemv_bits<8>(a, n0, n1, sc, ldsc, a.biases != nullptr);
}

// ---- prefill: the weight block repacked once so a vector holds one 4-byte step of W output columns ----
//
// Step s of a row is its s-th dword in the activations' order (4-bit: per chunk the L low-nibble dwords, then
// the L high-nibble ones); the block becomes tile[s][column] (int32 of 4 codes), read by every pass of
// activation rows, and a group's integer sums are taken whole before one float step per group:
//   y = sum over g in order of float(isum_g) * (s_g * d_g), then + the bias part as in gemv.

// The steps of group g: [s0, s0 + n) and [s1, s1 + n1) (the high nibbles of a group within one chunk).
template <int BITS, int GS>
inline void group_steps(int g, int& s0, int& n0, int& s1, int& n1) {
  constexpr int C = 4 * W * (8 / BITS);
  if constexpr (BITS == 8 || GS >= C) {
    s0 = g * GS / 4, n0 = GS / 4, s1 = 0, n1 = 0;
  } else {
    const int j = g * GS / C, i0 = (g * GS % C) / 8;
    s0 = j * 2 * W + i0, n0 = GS / 8, s1 = s0 + W, n1 = GS / 8;
  }
}

template <int BITS>
void repack(const MatArgs& a, int n0, int nb, int64_t nbp, int nsteps, int32_t* tile, int32_t* rowbuf) {
  constexpr int CB = 4 * W;
  const int64_t row_bytes = static_cast<int64_t>(a.K) * BITS / 8;
  const int nfull = static_cast<int>(row_bytes / CB), tail = static_cast<int>(row_bytes % CB);
  for (int r = 0; r < nb; ++r) {
    const uint8_t* wr = static_cast<const uint8_t*>(a.w) + (n0 + r) * a.w_row_bytes;
    for (int j = 0; j * CB < row_bytes; ++j) {
      const VI w = j < nfull ? iload(wr + j * CB) : iload_part(wr + j * CB, tail);
      if constexpr (BITS == 4) {
        istore(rowbuf + j * 2 * W, lo4(w));
        istore(rowbuf + j * 2 * W + W, hi4(w));
      } else {
        istore(rowbuf + j * W, w);
      }
    }
    for (int s = 0; s < nsteps; ++s) tile[s * nbp + r] = rowbuf[s];
  }
  for (int s = 0; s < nsteps; ++s)
    for (int64_t r = nb; r < nbp; ++r) tile[s * nbp + r] = 0;
}

template <int MR, int BITS, int GS>
void gemm_rows(const MatArgs& a, int n0, int nb, int m0, const int32_t* tile, int64_t nbp, const float* st,
               bool add) {
  constexpr int NV = Q3K_I8_GNV;
  const int G = a.K / GS;
  const int32_t* xr[MR];
  const float* dr[MR];
  for (int m = 0; m < MR; ++m) {
    xr[m] = reinterpret_cast<const int32_t*>(a.x8.codes + (m0 + m) * a.x8.ld);
    dr[m] = a.x8.d + (m0 + m) * a.x8.ldg;
  }
  for (int p = 0; p < nb; p += NV * W) {
    VF f[MR][NV];
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v) f[m][v] = vzero();
    for (int g = 0; g < G; ++g) {
      VI acc[MR][NV];
      for (int m = 0; m < MR; ++m)
        for (int v = 0; v < NV; ++v) acc[m][v] = izero();
      int r0, c0, r1, c1;
      group_steps<BITS, GS>(g, r0, c0, r1, c1);
      for (int half = 0; half < 2; ++half) {
        const int s0 = half ? r1 : r0, s1 = s0 + (half ? c1 : c0);
        for (int s = s0; s < s1; ++s) {
          VI wv[NV];
          for (int v = 0; v < NV; ++v) wv[v] = iload(tile + s * nbp + p + v * W);
          for (int m = 0; m < MR; ++m) {
            const VI xb = ibcast(xr[m][s]);
            for (int v = 0; v < NV; ++v) acc[m][v] = dot4(acc[m][v], wv[v], xb);
          }
        }
      }
      VF sv[NV];
      for (int v = 0; v < NV; ++v) sv[v] = vload(st + g * nbp + p + v * W);
      for (int m = 0; m < MR; ++m) {
        const VF dm = vset1(dr[m][g]);
        for (int v = 0; v < NV; ++v) f[m][v] = vadd(f[m][v], vmul(itof(acc[m][v]), vmul(sv[v], dm)));
      }
    }
    for (int m = 0; m < MR; ++m) {
      float* y = row_out(a, m0 + m) + n0 + p;
      for (int v = 0; v < NV; ++v) {
        alignas(64) float tmp[W];
        vstore(tmp, f[m][v]);
        for (int i = 0; i < W && p + v * W + i < nb; ++i) y[v * W + i] = add ? tmp[i] + y[v * W + i] : tmp[i];
      }
    }
  }
}

template <int BITS, int GS>
void gemm_passes(const MatArgs& a, int n0, int nb, const int32_t* tile, int64_t nbp, const float* st, bool add) {
  int m = 0;
  for (; m + Q3K_I8_GM <= a.M; m += Q3K_I8_GM) gemm_rows<Q3K_I8_GM, BITS, GS>(a, n0, nb, m, tile, nbp, st, add);
  for (; m < a.M; ++m) gemm_rows<1, BITS, GS>(a, n0, nb, m, tile, nbp, st, add);
}

template <int BITS>
void gemm_bits(const MatArgs& a, int n0, int nb, const int32_t* tile, int64_t nbp, const float* st, bool add) {
  if (a.gs == 32) return gemm_passes<BITS, 32>(a, n0, nb, tile, nbp, st, add);
  if (a.gs == 64) return gemm_passes<BITS, 64>(a, n0, nb, tile, nbp, st, add);
  return gemm_passes<BITS, 128>(a, n0, nb, tile, nbp, st, add);
}

void gemm8(const MatArgs& a, int n0, int n1) {
  thread_local Scratch tilebuf, rowbuf, scales, biases;
  const int G = a.K / a.gs, nb = n1 - n0;
  constexpr int panel = Q3K_I8_GNV * W;
  const int64_t nbp = (nb + panel - 1) / panel * panel;
  const int nsteps = static_cast<int>(a.x8.ld / 4);  // the activations' padded row, 4 codes a step
  int32_t* tile = reinterpret_cast<int32_t*>(tilebuf.get(static_cast<size_t>(nsteps) * nbp));
  int32_t* rb = reinterpret_cast<int32_t*>(rowbuf.get(static_cast<size_t>(nsteps) + 4 * W));
  float* st = zeroed(scales, G * nbp);
  float* bt = a.biases ? zeroed(biases, G * nbp) : nullptr;
  stage(a, n0, n1, st, 1, nbp, bt, nbp);
  if (bt) bias_part(a, n0, n1, bt, nbp);
  if (a.wt == WType::Q4) {
    repack<4>(a, n0, nb, nbp, nsteps, tile, rb);
    return gemm_bits<4>(a, n0, nb, tile, nbp, st, bt != nullptr);
  }
  repack<8>(a, n0, nb, nbp, nsteps, tile, rb);
  gemm_bits<8>(a, n0, nb, tile, nbp, st, bt != nullptr);
}

// ---- activations: one row quantized per group (int8.h), codes in the chunk order of `bits`-bit weights ----

void quantize_row(const float* x, int K, int gs, int bits, int8_t* codes, float* d, float* xs) {
  constexpr int C4 = 8 * W;  // 4-bit chunk values
  for (int g = 0; g < K / gs; ++g) {
    const float* xg = x + g * gs;
    VF mx = vzero();
    for (int k = 0; k < gs; k += W) mx = vmax(mx, vabs(vload(xg + k)));
    alignas(64) float lanes[W];
    vstore(lanes, mx);
    float amax = 0.f;
    for (int i = 0; i < W; ++i) amax = lanes[i] > amax ? lanes[i] : amax;
    const VF inv = vset1(amax > 0.f ? 127.f / amax : 0.f);
    VI sum = izero();
    for (int k = 0; k < gs; k += 2 * W) {
      // x * (127 / amax) rounded half to even (the default rounding mode): |code| <= 127
      const VI a = iround(vmul(vload(xg + k), inv)), b = iround(vmul(vload(xg + k + W), inv));
      sum = iadd(sum, iadd(a, b));
      const int v = g * gs + k;
      if (bits == 8) {
        store_codes(codes + v, a);
        store_codes(codes + v + W, b);
      } else {
        VI ev, od;
        split_even_odd(a, b, ev, od);
        int8_t* at = codes + v / C4 * C4 + (v % C4) / 2;
        store_codes(at, ev);
        store_codes(at + C4 / 2, od);
      }
    }
    alignas(64) int32_t si[W];
    istore(si, sum);
    int total = 0;
    for (int i = 0; i < W; ++i) total += si[i];
    d[g] = amax / 127.f;
    xs[g] = d[g] * static_cast<float>(total);
  }
}

}  // namespace

const Int8Kernels& int8_table() {
  static const Int8Kernels t{Q3K_I8_NAME, W, &quantize_row, &gemv8, &gemm8};
  return t;
}

}  // namespace q3k::Q3K_ISA
