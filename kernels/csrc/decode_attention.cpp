// Corpus attention for a few query rows (decoding steps): one pass over a chunk of bf16 keys and
// values computes the attention output and log-sum-exp of every row and, for the rows asked
// ("stat rows", the readout token), each document's max score, log-sum-exp and the gold
// documents' part of the output.  Memory-bound: each key and value row is read once for all
// rows, and the statistics come from the same scores (no second pass over the keys).
//
// Work is split over (KV head, part of the chunk); parts start at document boundaries so a
// document's statistics are written by one task.  Scores and sums are fp32; q.k accumulates in
// fp32 from bf16 inputs (as PyTorch's flash kernel does).
#include <torch/csrc/utils/pybind.h>  // the Tensor <-> Python caster
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "corpus_attention_common.h"

namespace {

constexpr int kBlock = 64;  // keys per block: scores [rows, 64] stay in L1

// Ablation builds for experiments/bench_kernels.py --part ablate, never a real one: each bit
// leaves one part of the work out (the results are then wrong), so the benchmark can time what
// that part costs.  1: q.k, 2: the exponentials, 4: p.v, 8: the key transposes (q.k reads the
// keys as if they were stored transposed).
#ifndef LENS_ABLATE
#define LENS_ABLATE 0
#endif
constexpr int kAblate = LENS_ABLATE;
using lens::kNegInf;
using lens::Partial;

inline __m512 bf16_to_f32(const uint16_t* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// e^x for 16 lanes: range reduction by ln 2, degree-6 polynomial, scalef (0 below ~-104, -inf -> 0).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-104.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// sum of exp(x[i] - shift) for i < n, and writes the terms to out (out may be null)
inline float exp_sum(const float* x, int n, float shift, float* out) {
  __m512 s = _mm512_setzero_ps();
  __m512 sh = _mm512_set1_ps(shift);
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), sh));
    if (out) _mm512_storeu_ps(out + i, e);
    s = _mm512_add_ps(s, e);
  }
  if (i < n) {
    __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
    __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), sh));
    e = _mm512_maskz_mov_ps(m, e);
    if (out) _mm512_mask_storeu_ps(out + i, m, e);
    s = _mm512_add_ps(s, e);
  }
  return _mm512_reduce_add_ps(s);
}

inline float max_of(const float* x, int n) {
  __m512 m = _mm512_set1_ps(kNegInf);
  int i = 0;
  for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + i));
  if (i < n) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(_mm512_set1_ps(kNegInf), (__mmask16)((1u << (n - i)) - 1), x + i));
  return _mm512_reduce_max_ps(m);
}

inline float sum_of(const float* x, int n) {
  __m512 m = _mm512_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16) m = _mm512_add_ps(m, _mm512_loadu_ps(x + i));
  if (i < n) m = _mm512_add_ps(m, _mm512_maskz_loadu_ps((__mmask16)((1u << (n - i)) - 1), x + i));
  return _mm512_reduce_add_ps(m);
}

// In-place transpose of a 16 x 16 matrix of 32-bit words (r[i] = row i -> r[j] = column j).
inline void transpose16(__m512i* r) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // u[4g + c], lane L: column 4L + c of rows 4g..4g+3
    u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    __m512i a = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), b = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xdd);
    __m512i e = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88), f = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xdd);
    r[c] = _mm512_shuffle_i32x4(a, e, 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(a, e, 0xdd);
    r[4 + c] = _mm512_shuffle_i32x4(b, f, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(b, f, 0xdd);
  }
}

// kt [W words][16 keys] <- the n (<= 16) keys at kblock (W = D/2 words each; keys past n: 0),
// transposed so one vector holds one word of 16 keys (the layout both q.k paths consume).
inline void transpose_keys(const uint16_t* kblock, int n, int W, uint32_t* kt) {
  const int64_t D = 2 * W;
  for (int c0 = 0; c0 < W; c0 += 16) {
    __m512i rows[16];
    for (int i = 0; i < 16; ++i)
      rows[i] = i < n ? _mm512_loadu_si512(kblock + i * D + 2 * c0) : _mm512_setzero_si512();
    transpose16(rows);
    for (int j = 0; j < 16; ++j) _mm512_storeu_si512(kt + (c0 + j) * 16, rows[j]);
  }
}

// 16 keys' scaled scores into out; lanes past the valid keys get -inf.
inline void store_scores(float* out, __m512 dots, float scale, __mmask16 valid) {
  _mm512_storeu_ps(out, _mm512_mask_blend_ps(valid, _mm512_set1_ps(kNegInf), _mm512_mul_ps(dots, _mm512_set1_ps(scale))));
}

constexpr int kRowGroup = 4;  // query rows computed together (buffers are padded to a multiple)

// sc[r * kBlock + i] = scale[r] * q_r . k_i for the block's nb keys (lanes past nb: -inf).  q.k
// with vdpbf16ps: bf16 pairs multiplied exactly and summed in fp32.  The keys of 16 at a time are
// transposed (kt: [D/2][16] words) so each instruction computes 16 keys' partial dot products.
inline void block_scores(const uint16_t* kblock, int nb, int64_t D, const uint32_t* qd, int64_t R_pad, const float* scale,
                         float* sc, uint32_t* kt) {
  const int W = (int)(D / 2);
  for (int k0 = 0; k0 < nb; k0 += 16) {
    const int n = std::min(16, nb - k0);
    transpose_keys(kblock + (int64_t)k0 * D, n, W, kt);
    const __mmask16 valid = (__mmask16)(n == 16 ? 0xffff : (1u << n) - 1);
    for (int64_t r0 = 0; r0 < R_pad; r0 += kRowGroup) {
      __m512 acc[2][kRowGroup];  // two chains per row: vdpbf16ps's latency, not its throughput, bounds one
      for (int rr = 0; rr < kRowGroup; ++rr) acc[0][rr] = acc[1][rr] = _mm512_setzero_ps();
      const uint32_t* q0 = qd + r0 * W;
      for (int j = 0; j < W; j += 2) {
        __m512bh c0 = (__m512bh)_mm512_loadu_si512(kt + j * 16), c1 = (__m512bh)_mm512_loadu_si512(kt + (j + 1) * 16);
        for (int rr = 0; rr < kRowGroup; ++rr) {
          acc[0][rr] = _mm512_dpbf16_ps(acc[0][rr], c0, (__m512bh)_mm512_set1_epi32((int)q0[rr * W + j]));
          acc[1][rr] = _mm512_dpbf16_ps(acc[1][rr], c1, (__m512bh)_mm512_set1_epi32((int)q0[rr * W + j + 1]));
        }
      }
      for (int rr = 0; rr < kRowGroup; ++rr)
        store_scores(sc + (r0 + rr) * kBlock + k0, _mm512_add_ps(acc[0][rr], acc[1][rr]), scale[r0 + rr], valid);
    }
  }
}

// AMX: the same scores with tile matrix multiplies, up to 16 query rows x 16 keys per instruction
// (the transposed keys kt are already the B operand's pair-interleaved layout).  Used when the
// kernel may use the tiles (Linux grants them per process) and LENS_NATIVE_AMX is not 0.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline bool amx_available() {
  static const bool ok = [] {
    const char* env = std::getenv("LENS_NATIVE_AMX");
    if (env != nullptr && std::string(env) == "0") return false;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  }();
  return ok;
}

inline void amx_configure() {
  TileConfig cfg;
  for (int t = 0; t < 3; ++t) {  // 0: scores [16 rows, 16 keys] fp32; 1: q [16 rows, 32 bf16]; 2: keys [16 pairs, 16 keys]
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// qd has R_tiles * 16 rows (zero past R); sc receives rows < R_pad.
inline void block_scores_amx(const uint16_t* kblock, int nb, int64_t D, const uint32_t* qd, int64_t R_pad,
                             const float* scale, float* sc, uint32_t* kt, float* ctile) {
  const int W = (int)(D / 2);
  for (int k0 = 0; k0 < nb; k0 += 16) {
    const int n = std::min(16, nb - k0);
    if constexpr (kAblate & 8)
      kt = const_cast<uint32_t*>(reinterpret_cast<const uint32_t*>(kblock + (int64_t)k0 * D));
    else
      transpose_keys(kblock + (int64_t)k0 * D, n, W, kt);
    const __mmask16 valid = (__mmask16)(n == 16 ? 0xffff : (1u << n) - 1);
    for (int64_t r0 = 0; r0 < R_pad; r0 += 16) {
      _tile_zero(0);
      for (int c0 = 0; c0 < W; c0 += 16) {
        _tile_loadd(1, qd + r0 * W + c0, W * 4);
        _tile_loadd(2, kt + c0 * 16, 64);
        _tile_dpbf16ps(0, 1, 2);
      }
      _tile_stored(0, ctile, 64);
      const int64_t rn = std::min<int64_t>(16, R_pad - r0);
      for (int64_t rr = 0; rr < rn; ++rr)
        store_scores(sc + (r0 + rr) * kBlock + k0, _mm512_loadu_ps(ctile + rr * 16), scale[r0 + rr], valid);
    }
  }
}

// acc[r] += sum_i pr[r, i] * v_i over the block (fp32).  One row group converts the values from
// bf16 as it reads them; several convert the block once into vf and read that.
template <int NV, int RG>
inline void block_values(const uint16_t* vblock, int nb, const float* pr, int64_t R_pad, float* acc, float* vf) {
  constexpr int D = 16 * NV;
  if (R_pad > RG) {
    for (int i = 0; i < nb; ++i)
      for (int j = 0; j < NV; ++j) _mm512_storeu_ps(vf + i * D + 16 * j, bf16_to_f32(vblock + (int64_t)i * D + 16 * j));
    for (int64_t r0 = 0; r0 < R_pad; r0 += RG) {
      __m512 a[RG][NV];
      for (int rr = 0; rr < RG; ++rr)
        for (int j = 0; j < NV; ++j) a[rr][j] = _mm512_loadu_ps(acc + (r0 + rr) * D + 16 * j);
      for (int i = 0; i < nb; ++i) {
        for (int rr = 0; rr < RG; ++rr) {
          __m512 p = _mm512_set1_ps(pr[(r0 + rr) * kBlock + i]);
          for (int j = 0; j < NV; ++j) a[rr][j] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vf + i * D + 16 * j), a[rr][j]);
        }
      }
      for (int rr = 0; rr < RG; ++rr)
        for (int j = 0; j < NV; ++j) _mm512_storeu_ps(acc + (r0 + rr) * D + 16 * j, a[rr][j]);
    }
    return;
  }
  for (int64_t r0 = 0; r0 < R_pad; r0 += RG) {
    __m512 a[RG][NV];
    for (int rr = 0; rr < RG; ++rr)
      for (int j = 0; j < NV; ++j) a[rr][j] = _mm512_loadu_ps(acc + (r0 + rr) * D + 16 * j);
    for (int i = 0; i < nb; ++i) {
      __m512 v[NV];
      for (int j = 0; j < NV; ++j) v[j] = bf16_to_f32(vblock + (int64_t)i * D + 16 * j);
      for (int rr = 0; rr < RG; ++rr) {
        __m512 p = _mm512_set1_ps(pr[(r0 + rr) * kBlock + i]);
        for (int j = 0; j < NV; ++j) a[rr][j] = _mm512_fmadd_ps(p, v[j], a[rr][j]);
      }
    }
    for (int rr = 0; rr < RG; ++rr)
      for (int j = 0; j < NV; ++j) _mm512_storeu_ps(acc + (r0 + rr) * D + 16 * j, a[rr][j]);
  }
}

inline void block_values_any(const uint16_t* vblock, int nb, int64_t D, const float* pr, int64_t R_pad, float* acc,
                             float* vf) {
  switch (D) {  // RG must divide kRowGroup
    case 64: return block_values<4, 4>(vblock, nb, pr, R_pad, acc, vf);
    case 128: return block_values<8, 2>(vblock, nb, pr, R_pad, acc, vf);
    case 32: return block_values<2, 4>(vblock, nb, pr, R_pad, acc, vf);
    default: TORCH_CHECK(false, "decode_attention: head dim ", D, " not built (32, 64, 128)");
  }
}

}  // namespace

// q [G, R, D] bf16; keys, values [G, T, D] bf16 (rows contiguous); the rest as lens::Call says.
// Returns out, lse, doc_max, doc_lse, gold_out, route_max, route_sum, route_lo (lens::Call).
std::vector<at::Tensor> decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                                         double scale, const at::Tensor& key_doc, int64_t n_docs,
                                         const at::Tensor& stat_rows, const at::Tensor& gold_mask,
                                         const std::optional<at::Tensor>& row_scale,
                                         const std::optional<at::Tensor>& route_rows,
                                         const std::optional<at::Tensor>& route_group) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && keys.scalar_type() == at::kBFloat16 &&
              values.scalar_type() == at::kBFloat16, "decode_attention: bf16 q, keys and values");
  lens::Call c(q, keys, values, key_doc, n_docs, stat_rows, gold_mask, scale, row_scale, route_rows, route_group,
               kRowGroup);
  const int64_t G = c.G, D = c.D, R = c.R, S = c.S, n_parts = c.n_parts();
  const bool stats = c.stats, route = c.route;
  const int64_t* kd = c.kd;
  const bool* gmask = c.gmask;
  const bool has_gold = gmask != nullptr;
  const std::vector<int64_t>& srow = c.srow;
  const std::vector<int64_t>& bounds = c.bounds;
  auto qc = c.q;
  std::vector<Partial> parts(G * n_parts);
  const auto* kp = reinterpret_cast<const uint16_t*>(keys.data_ptr<at::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>());
  const int64_t ks0 = keys.stride(0), vs0 = values.stride(0);
  float* dmax = c.doc_max.data_ptr<float>();
  float* dlse = c.doc_lse.data_ptr<float>();
  const int nv = (int)(D / 16);
  const auto* qp = reinterpret_cast<const uint16_t*>(qc.data_ptr<at::BFloat16>());

  const int64_t R_pad = c.R_pad;
  const bool use_amx = amx_available();
  at::parallel_for(0, G * n_parts, 1, [&](int64_t begin, int64_t end) {
    // flush denormals to zero: probabilities far below the row's max (real attention has gaps of
    // ~100 nats) would otherwise make the FMAs take microcode assists, several times slower.
    // Terms below 1e-38 of the max do not change an fp32 sum.
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);  // FTZ | DAZ
    const int64_t R_tiles = (R_pad + 15) / 16 * 16;  // the AMX path reads q in tiles of 16 rows
    std::vector<uint32_t> qd(R_tiles * D / 2, 0), kt(D / 2 * 16);
    std::vector<float> ctile(16 * 16);
    if (use_amx) amx_configure();
    std::vector<float> sc(R_pad * kBlock), pr(R_pad * kBlock), vf(kBlock * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / n_parts, part = task % n_parts;
      const int64_t t0 = bounds[part], t1 = bounds[part + 1];
      std::memcpy(qd.data(), qp + g * R * D, R * D * sizeof(uint16_t));  // rows past R stay 0
      Partial& P = parts[task];
      P.reset(R_pad, D, S);
      lens::DocRuns runs(S, n_docs, dmax + g * S * n_docs, dlse + g * S * n_docs);
      const uint16_t* kbase = kp + g * ks0;
      const uint16_t* vbase = vp + g * vs0;
      const float* rs = c.rscale.data() + g * R_pad;
      for (int64_t b = t0; b < t1; b += kBlock) {
        const int nb = (int)std::min<int64_t>(kBlock, t1 - b);
        {  // prefetch the keys and values two blocks ahead (two streams per task; the hardware
           // prefetcher alone left the loads stalling)
          const int64_t ahead = b + 2 * kBlock, stop = std::min<int64_t>(ahead + kBlock, t1);
          for (int64_t line = ahead * D * 2; line < stop * D * 2; line += 64) {
            _mm_prefetch(reinterpret_cast<const char*>(kbase) + line, _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(vbase) + line, _MM_HINT_T0);
          }
        }
        if constexpr (kAblate & 1) {
        } else if (use_amx) {
          block_scores_amx(kbase + b * D, nb, D, qd.data(), R_pad, rs, sc.data(), kt.data(), ctile.data());
        } else {
          block_scores(kbase + b * D, nb, D, qd.data(), R_pad, rs, sc.data(), kt.data());
        }
        // online softmax: rescale, probabilities
        for (int64_t r = 0; r < R_pad; ++r) {
          float* s_r = sc.data() + r * kBlock;
          float m_new = std::max(P.m[r], max_of(s_r, nb));
          float alpha = std::exp(P.m[r] - m_new);  // m starts at -inf: alpha 0
          if (alpha != 1.f) {
            P.l[r] *= alpha;
            for (int64_t j = 0; j < D; ++j) P.acc[r * D + j] *= alpha;
            for (int64_t s = 0; s < S; ++s)
              if (srow[s] == r)  // run sums are relative to their run's own max: no rescale
                for (int64_t j = 0; j < D; ++j) P.gold[s * D + j] *= alpha;
          }
          P.m[r] = m_new;
          if constexpr (!(kAblate & 2)) P.l[r] += exp_sum(s_r, nb, m_new, pr.data() + r * kBlock);
        }
        if constexpr (!(kAblate & 4)) block_values_any(vbase + b * D, nb, D, pr.data(), R_pad, P.acc.data(), vf.data());
        if (!stats && !route) continue;
        // per-document statistics of the stat rows and routing rows, one run of equal key_doc at a time
        for (int i = 0; i < nb;) {
          const int64_t d = kd[b + i];
          int e = i + 1;
          while (e < nb && kd[b + e] == d) ++e;
          if (d >= 0 && route) c.route_run(g, d, sc.data(), kBlock, i, e, max_of, sum_of);
          if (d >= 0) {
            for (int64_t s = 0; s < S; ++s) {
              const int64_t r = srow[s];
              const float* s_r = sc.data() + r * kBlock + i;
              float seg_max = max_of(s_r, e - i);
              float seg_sum = exp_sum(s_r, e - i, seg_max, nullptr);
              runs.add(s, d, seg_max, seg_sum);
              if (has_gold && gmask[s * n_docs + d]) {
                float* ga = P.gold.data() + s * D;
                for (int k = i; k < e; ++k) {
                  __m512 p = _mm512_set1_ps(pr[r * kBlock + k]);
                  for (int j = 0; j < nv; ++j)
                    _mm512_storeu_ps(ga + 16 * j, _mm512_fmadd_ps(p, bf16_to_f32(vbase + (b + k) * D + 16 * j),
                                                                  _mm512_loadu_ps(ga + 16 * j)));
                }
              }
            }
          }
          i = e;
        }
      }
      runs.flush_all();
    }
    if (use_amx) _tile_release();
    _mm_setcsr(csr);
  });

  c.combine(parts);
  return c.results();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("decode_attention", &decode_attention, "corpus attention for a few rows with per-document statistics",
        py::arg("q"), py::arg("keys"), py::arg("values"), py::arg("scale"), py::arg("key_doc"), py::arg("n_docs"),
        py::arg("stat_rows"), py::arg("gold_mask"), py::arg("row_scale") = py::none(),
        py::arg("route_rows") = py::none(), py::arg("route_group") = py::none());
  m.def("uses_amx", &amx_available, "whether q.k runs on AMX tiles (else AVX-512 BF16 dot products)");
}
