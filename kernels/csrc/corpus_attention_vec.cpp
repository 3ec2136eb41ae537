// Corpus attention for a few query rows, written once with ATen's at::vec::Vectorized<float> and
// compiled per instruction set (AVX2+FMA, AVX-512, aarch64 NEON, or the scalar fallback) by
// kernels/native.py.  The same one-pass algorithm and interface as decode_attention.cpp: each key
// and value row is read once for all rows, and the attention output, the log-sum-exp, and for the
// "stat rows" each document's max score, log-sum-exp and the gold documents' part of the output
// come from the same scores.
//
// q, keys and values are fp32 or bf16 (each on its own: bf16 keys and values with fp32 queries
// is the "store bf16, compute fp32" mode); every score and sum is fp32.  Work is split over
// (KV head, part of the chunk); parts start at document boundaries so one task writes each
// document's statistics.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/utils/pybind.h>  // the Tensor <-> Python caster
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "corpus_attention_common.h"

#ifndef LENS_ISA
#define LENS_ISA vec_default
#endif
#define LENS_STR2(x) #x
#define LENS_STR(x) LENS_STR2(x)

namespace {

using lens::kNegInf;
using lens::Partial;
using Vec = at::vec::Vectorized<float>;
constexpr int L = Vec::size();
constexpr int kBlock = 64;  // keys per block: a block's fp32 keys, values and scores stay in L1

// fp32 copies of n rows of d values (bf16 -> fp32 is a 16-bit shift; the loop vectorises)
inline void to_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void to_float(const at::BFloat16* src, float* dst, int64_t n) {
  const auto* s = reinterpret_cast<const uint16_t*>(src);
  auto* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}

inline float hsum(const Vec& v) { return at::vec::vec_reduce_all<float>(std::plus<Vec>(), v); }

inline float max_of(const float* x, int n) {
  Vec m(kNegInf);
  int i = 0;
  for (; i + L <= n; i += L) m = at::vec::maximum(m, Vec::loadu(x + i));
  float r = at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, m);
  for (; i < n; ++i) r = std::max(r, x[i]);
  return r;
}

inline float sum_of(const float* x, int n) {
  Vec m(0.f);
  int i = 0;
  for (; i + L <= n; i += L) m = m + Vec::loadu(x + i);
  float r = hsum(m);
  for (; i < n; ++i) r += x[i];
  return r;
}

// sum of exp(x[i] - shift) for i < n; writes the terms to out (out may be null)
inline float exp_sum(const float* x, int n, float shift, float* out) {
  Vec s(0.f), sh(shift);
  int i = 0;
  for (; i + L <= n; i += L) {
    Vec e = (Vec::loadu(x + i) - sh).exp_u20();
    if (out) e.store(out + i);
    s = s + e;
  }
  if (i < n) {
    Vec e = Vec::set(Vec(0.f), (Vec::loadu(x + i, n - i) - sh).exp_u20(), n - i);
    if (out) e.store(out + i, n - i);
    s = s + e;
  }
  return hsum(s);
}

// The lane sums of a[0..7]: a[0..3]'s times s0 into o0[0..3], a[4..7]'s times s1 into o1[0..3]
// (one shuffle tree on x86, lane sums elsewhere).
inline void sums8(const Vec* a, float s0, float s1, float* o0, float* o1) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  __m256 h[8];
  for (int k = 0; k < 8; ++k) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 v = a[k];
    h[k] = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
#else
    h[k] = a[k];
#endif
  }
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(h[4], h[5]), _mm256_hadd_ps(h[6], h[7]));
  const __m256 r = _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
  _mm_storeu_ps(o0, _mm_mul_ps(_mm256_castps256_ps128(r), _mm_set1_ps(s0)));
  _mm_storeu_ps(o1, _mm_mul_ps(_mm256_extractf128_ps(r, 1), _mm_set1_ps(s1)));
#else
  for (int k = 0; k < 4; ++k) o0[k] = hsum(a[k]) * s0, o1[k] = hsum(a[4 + k]) * s1;
#endif
}

// sc[r * kBlock + i] = scale[r] * q_r . k_i for the block's nb keys; lanes past nb get -inf.
// Register tiles of two rows by four keys: each load of a key serves two rows, each load of q
// four keys.  key(i) points at key i's D fp32 values, zero past nb.
template <int D, typename KeyAt>
inline void block_scores(const KeyAt& key, int nb, const float* qf, int64_t R, const float* scale, float* sc) {
  float spare[4];
  for (int i = 0; i < nb; i += 4) {
    const float *k0 = key(i), *k1 = key(i + 1), *k2 = key(i + 2), *k3 = key(i + 3);
    for (int64_t r = 0; r < R; r += 2) {
      const bool pair = r + 1 < R;
      const float* qa = qf + r * D;
      const float* qb = pair ? qa + D : qa;
      Vec a[8];
      for (int j = 0; j < 8; ++j) a[j] = Vec(0.f);
      for (int c = 0; c < D; c += L) {
        const Vec x = Vec::loadu(qa + c), y = Vec::loadu(qb + c);
        const Vec w0 = Vec::loadu(k0 + c), w1 = Vec::loadu(k1 + c), w2 = Vec::loadu(k2 + c), w3 = Vec::loadu(k3 + c);
        a[0] = at::vec::fmadd(x, w0, a[0]), a[1] = at::vec::fmadd(x, w1, a[1]);
        a[2] = at::vec::fmadd(x, w2, a[2]), a[3] = at::vec::fmadd(x, w3, a[3]);
        a[4] = at::vec::fmadd(y, w0, a[4]), a[5] = at::vec::fmadd(y, w1, a[5]);
        a[6] = at::vec::fmadd(y, w2, a[6]), a[7] = at::vec::fmadd(y, w3, a[7]);
      }
      sums8(a, scale[r], pair ? scale[r + 1] : 0.f, sc + r * kBlock + i, pair ? sc + (r + 1) * kBlock + i : spare);
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int i = nb; i < (nb + 7) / 8 * 8; ++i) sc[r * kBlock + i] = kNegInf;
}

// acc[r] += sum_i pr[r, i] * v_i over the block (vf: [nb][D] fp32).  Register tiles of RT rows by
// CT vectors of the head dim: each load of a value serves RT rows, the accumulators stay in
// registers across the block's keys.
template <int D, int RT>
inline void values_tile(const float* vf, int nb, const float* p, float* acc) {
  constexpr int NV = D / L, CT = NV < 4 ? NV : 4;
  static_assert(NV % CT == 0, "head dim must be a multiple of the column tile");
  for (int c0 = 0; c0 < NV; c0 += CT) {
    Vec a[RT][CT];
    for (int r = 0; r < RT; ++r)
      for (int j = 0; j < CT; ++j) a[r][j] = Vec::loadu(acc + r * D + (c0 + j) * L);
    for (int i = 0; i < nb; ++i) {
      const float* v = vf + (int64_t)i * D + c0 * L;
      Vec pv[RT];
      for (int r = 0; r < RT; ++r) pv[r] = Vec(p[r * kBlock + i]);
      for (int j = 0; j < CT; ++j) {
        const Vec x = Vec::loadu(v + j * L);
        for (int r = 0; r < RT; ++r) a[r][j] = at::vec::fmadd(pv[r], x, a[r][j]);
      }
    }
    for (int r = 0; r < RT; ++r)
      for (int j = 0; j < CT; ++j) a[r][j].store(acc + r * D + (c0 + j) * L);
  }
}

template <int D>
inline void block_values(const float* vf, int nb, const float* pr, int64_t R, float* acc) {
  int64_t r = 0;
  for (; r + 3 <= R; r += 3) values_tile<D, 3>(vf, nb, pr + r * kBlock, acc + r * D);
  for (; r < R; ++r) values_tile<D, 1>(vf, nb, pr + r * kBlock, acc + r * D);
}

// y += a * x and x *= a over N floats (N = the head dim, a multiple of the vector width)
template <int N>
inline void axpy(float a, const float* x, float* y) {
  static_assert(N % L == 0, "head dim must be a multiple of the vector width");
  Vec av(a);
  for (int j = 0; j < N; j += L) at::vec::fmadd(av, Vec::loadu(x + j), Vec::loadu(y + j)).store(y + j);
}

template <int N>
inline void scale_rows(float* x, float a) {
  Vec av(a);
  for (int j = 0; j < N; j += L) (Vec::loadu(x + j) * av).store(x + j);
}

// Asks for n bytes from p to be brought into the cache (one request per 64-byte line).  With
// few query rows the kernel is bound by how fast it reads keys and values, not by its
// arithmetic; requesting the blocks ahead of the one being computed keeps more reads in flight
// than the hardware prefetchers alone do.
inline void prefetch(const void* p, int64_t n) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < n; o += 64) __builtin_prefetch(c + o, 0, 3);
}
constexpr int kAhead = 2;  // blocks ahead

// Denormal probabilities (scores ~100 nats below the row's max) would make the FMAs take
// microcode assists on x86; terms below 1e-38 of the max do not change an fp32 sum, so they are
// flushed to zero for the kernel's duration.
struct FlushDenormals {
#if defined(__x86_64__) || defined(_M_X64)
  unsigned int csr = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(csr | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(csr); }
#endif
};

template <int D, typename QT, typename KT>
void run(lens::Call& c, const QT* qp, const KT* kp, const KT* vp, int64_t ks0, int64_t vs0) {
  const int64_t G = c.G, R = c.R, S = c.S, n_docs = c.n_docs, n_parts = c.n_parts();
  const bool stats = c.stats, route = c.route;
  const int64_t* kd = c.kd;
  const bool* gmask = c.gmask;
  const std::vector<int64_t>& srow = c.srow;
  const std::vector<int64_t>& bounds = c.bounds;
  float* dmax = c.doc_max.data_ptr<float>();
  float* dlse = c.doc_lse.data_ptr<float>();
  std::vector<Partial> parts(G * n_parts);
  at::parallel_for(0, G * n_parts, 1, [&](int64_t begin, int64_t end) {
    FlushDenormals ftz;
    std::vector<float> qf(R * D), kf((kBlock + 8) * D, 0.f), vf(kBlock * D), sc(R * kBlock), pr(R * kBlock);
    constexpr bool kFloat = std::is_same_v<KT, float>;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / n_parts, part = task % n_parts;
      const int64_t t0 = bounds[part], t1 = bounds[part + 1];
      to_float(qp + g * R * D, qf.data(), R * D);
      Partial& P = parts[task];
      P.reset(R, D, S);
      lens::DocRuns runs(S, n_docs, dmax + g * S * n_docs, dlse + g * S * n_docs);
      const KT* kbase = kp + g * ks0;
      const KT* vbase = vp + g * vs0;
      const float* rs = c.rscale.data() + g * c.R_pad;
      for (int64_t b = t0; b < t1; b += kBlock) {
        const int nb = (int)std::min<int64_t>(kBlock, t1 - b);
        if (const int64_t a = b + kAhead * kBlock; a < t1) {
          const int64_t bytes = std::min<int64_t>(kBlock, t1 - a) * D * (int64_t)sizeof(KT);
          prefetch(kbase + a * D, bytes);
          prefetch(vbase + a * D, bytes);
        }
        // fp32 keys are read in place; bf16 ones (and an fp32 block's last, partial group of 8)
        // are converted into kf, zero past nb
        const int whole = kFloat ? nb / 8 * 8 : 0;
        to_float(kbase + (b + whole) * D, kf.data() + (int64_t)whole * D, (int64_t)(nb - whole) * D);
        std::fill(kf.begin() + (int64_t)nb * D, kf.begin() + (int64_t)(nb + 8) * D, 0.f);
        const float* kin = reinterpret_cast<const float*>(kbase + b * D);
        auto key = [&](int i) { return i < whole ? kin + (int64_t)i * D : kf.data() + (int64_t)i * D; };
        block_scores<D>(key, nb, qf.data(), R, rs, sc.data());
        for (int64_t r = 0; r < R; ++r) {  // online softmax: rescale, probabilities
          float* s_r = sc.data() + r * kBlock;
          const float m_new = std::max(P.m[r], max_of(s_r, nb));
          const float alpha = std::exp(P.m[r] - m_new);  // m starts at -inf: alpha 0
          if (alpha != 1.f) {
            P.l[r] *= alpha;
            scale_rows<D>(P.acc.data() + r * D, alpha);
            for (int64_t s = 0; s < S; ++s)
              if (srow[s] == r) scale_rows<D>(P.gold.data() + s * D, alpha);  // run sums are relative to their run's max
          }
          P.m[r] = m_new;
          P.l[r] += exp_sum(s_r, nb, m_new, pr.data() + r * kBlock);
        }
        const float* vrows = vf.data();
        if constexpr (kFloat)
          vrows = reinterpret_cast<const float*>(vbase + b * D);
        else
          to_float(vbase + b * D, vf.data(), (int64_t)nb * D);
        block_values<D>(vrows, nb, pr.data(), R, P.acc.data());
        if (!stats && !route) continue;
        for (int i = 0; i < nb;) {  // per-document statistics of the stat and routing rows, one run of equal key_doc at a time
          const int64_t d = kd[b + i];
          int e = i + 1;
          while (e < nb && kd[b + e] == d) ++e;
          if (d >= 0 && route) c.route_run(g, d, sc.data(), kBlock, i, e, max_of, sum_of);
          if (d >= 0) {
            for (int64_t s = 0; s < S; ++s) {
              const int64_t r = srow[s];
              const float* s_r = sc.data() + r * kBlock + i;
              const float seg_max = max_of(s_r, e - i);
              const float seg_sum = exp_sum(s_r, e - i, seg_max, nullptr);
              runs.add(s, d, seg_max, seg_sum);
              if (gmask && gmask[s * n_docs + d])
                for (int k = i; k < e; ++k) axpy<D>(pr[r * kBlock + k], vrows + (int64_t)k * D, P.gold.data() + s * D);
            }
          }
          i = e;
        }
      }
      runs.flush_all();
    }
  });

  c.combine(parts);
}

template <int D>
void dispatch_types(lens::Call& c, const at::Tensor& keys, const at::Tensor& values) {
  const int64_t ks0 = keys.stride(0), vs0 = values.stride(0);
  auto go_with = [&](auto* qp) {
    if (keys.scalar_type() == at::kBFloat16)
      run<D>(c, qp, keys.data_ptr<at::BFloat16>(), values.data_ptr<at::BFloat16>(), ks0, vs0);
    else
      run<D>(c, qp, keys.data_ptr<float>(), values.data_ptr<float>(), ks0, vs0);
  };
  if (c.q.scalar_type() == at::kBFloat16)
    go_with(c.q.data_ptr<at::BFloat16>());
  else
    go_with(c.q.data_ptr<float>());
}

}  // namespace

// q [G, R, D]; keys, values [G, T, D] (rows contiguous); q and keys/values each fp32 or bf16
// (keys and values alike); the rest as lens::Call says.  Returns out, lse, doc_max, doc_lse,
// gold_out, route_max, route_sum, route_lo (lens::Call).
std::vector<at::Tensor> decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                                         double scale, const at::Tensor& key_doc, int64_t n_docs,
                                         const at::Tensor& stat_rows, const at::Tensor& gold_mask,
                                         const std::optional<at::Tensor>& row_scale,
                                         const std::optional<at::Tensor>& route_rows,
                                         const std::optional<at::Tensor>& route_group) {
  auto ok_type = [](const at::Tensor& t) { return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16; };
  TORCH_CHECK(ok_type(q) && ok_type(keys) && keys.scalar_type() == values.scalar_type(),
              "decode_attention: q, keys and values must be fp32 or bf16 (keys and values alike)");
  lens::Call c(q, keys, values, key_doc, n_docs, stat_rows, gold_mask, scale, row_scale, route_rows, route_group);
  if (c.T == 0) {
    c.out.zero_();
    c.lse.fill_(kNegInf);
    return c.results();
  }
  switch (c.D) {
    case 32: dispatch_types<32>(c, keys, values); break;
    case 64: dispatch_types<64>(c, keys, values); break;
    default: dispatch_types<128>(c, keys, values);
  }
  return c.results();
}

bool uses_amx() { return false; }
std::string isa() { return LENS_STR(LENS_ISA); }  // the path name, "-" written "_"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("decode_attention", &decode_attention, "corpus attention for a few rows with per-document statistics",
        py::arg("q"), py::arg("keys"), py::arg("values"), py::arg("scale"), py::arg("key_doc"), py::arg("n_docs"),
        py::arg("stat_rows"), py::arg("gold_mask"), py::arg("row_scale") = py::none(),
        py::arg("route_rows") = py::none(), py::arg("route_group") = py::none());
  m.def("uses_amx", &uses_amx, "whether q.k runs on AMX tiles (never in this build)");
  m.def("isa", &isa, "the instruction set this build was compiled for");
  m.def("vector_floats", [] { return (int)L; }, "fp32 lanes of one vector in this build");
}
