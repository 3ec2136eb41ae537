// What the corpus-attention kernels share (decode_attention.cpp, corpus_attention_vec.cpp): the
// interface's checks, the outputs, the chunk's split into parts at document boundaries, and the
// combination of the parts' running softmaxes.  The arithmetic in between is each kernel's own.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace lens {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Partial {  // one task's running softmax for every row
  std::vector<float> m, l, acc, gold;  // m, l [rows]; acc [rows, D]; gold [S, D]

  void reset(int64_t rows, int64_t D, int64_t S) {
    m.assign(rows, kNegInf);
    l.assign(rows, 0.f);
    acc.assign(rows * D, 0.f);
    gold.assign(S * D, 0.f);
  }
};

inline float log_add_exp(float a, float b) {
  if (a == kNegInf) return b;
  if (b == kNegInf) return a;
  const float m = std::max(a, b);
  return m + std::log(std::exp(a - m) + std::exp(b - m));
}

// Per stat row, the document run in progress in one task (its max score and the sum of
// exp(score - max)), folded into KV head g's doc_max / doc_lse when the run ends.  A document's
// keys are one run, so one task writes each document's statistics.
struct DocRuns {
  std::vector<int64_t> doc;
  std::vector<float> max, sum;
  float *dmax, *dlse;
  int64_t S, n_docs;

  DocRuns(int64_t stat_rows, int64_t docs, float* doc_max_g, float* doc_lse_g)
      : doc(stat_rows, -1), max(stat_rows, kNegInf), sum(stat_rows, 0.f), dmax(doc_max_g), dlse(doc_lse_g),
        S(stat_rows), n_docs(docs) {}

  // a segment of document d's keys at stat row s: its max score and sum of exp(score - that max)
  void add(int64_t s, int64_t d, float seg_max, float seg_sum) {
    if (doc[s] == d) {
      const float mx = std::max(max[s], seg_max);
      sum[s] = sum[s] * std::exp(max[s] - mx) + seg_sum * std::exp(seg_max - mx);
      max[s] = mx;
      return;
    }
    flush(s);
    doc[s] = d, max[s] = seg_max, sum[s] = seg_sum;
  }

  void flush(int64_t s) {
    const int64_t d = doc[s];
    if (d < 0) return;
    float* mx = dmax + s * n_docs + d;
    float* lx = dlse + s * n_docs + d;
    *mx = std::max(*mx, max[s]);
    *lx = log_add_exp(*lx, max[s] + std::log(sum[s]));
  }

  void flush_all() {
    for (int64_t s = 0; s < S; ++s) flush(s);
  }
};

// One call's checked inputs and its outputs.
//
// q [G, R, D]; keys, values [G, T, D] (rows contiguous); key_doc int64 [T] (-1: no document) or
// empty; stat_rows int64 [S]; gold_mask bool [S, n_docs] or empty; row_scale fp32 [G, R] or empty
// (each row's scores are scale * q.k * row_scale: an intervention that scales rows, applied in
// fp32); route_rows, route_group int64 [RR] (both empty: no routing scores).  Outputs: out
// [G, R, D] fp32 (normalised), lse [G, R], doc_max / doc_lse [G, S, n_docs] (-inf where a document
// has no key in the chunk), gold_out [G, S, D] (normalised by the row's lse), and over the
// chunk's documents d_lo..d_lo+width-1 (d_lo the least document id in key_doc, width up to its
// greatest; results' last, route_lo, holds d_lo): route_max [G, groups, width], per group
// (route_group's values) the max over its rows and each document's keys of the raw score
// scale * q.k (routing ranks documents before any intervention, -inf for a document without
// keys), and route_sum [G, RR, width], each routing row's sum of raw scores over each document's
// keys (mean-key routing).  The dtypes of q, keys and values are the caller's to check.
struct Call {
  int64_t G = 0, T = 0, D = 0, R = 0, R_pad = 0, S = 0, n_docs = 0, RR = 0, n_groups = 0;  // R_pad: R to a multiple of the kernel's row group
  int64_t d_lo = 0, width = 0;  // the routing outputs' documents
  bool stats = false, route = false;
  const int64_t* kd = nullptr;  // key_doc, or null
  const bool* gmask = nullptr;  // gold_mask, or null
  std::vector<int64_t> srow;    // the stat rows
  std::vector<int64_t> rrow, rgroup;  // the routing rows and their groups
  std::vector<float> rscale;          // [G, R_pad] each row's score scale (scale * row_scale), 0 past R
  std::vector<float> rfactor;         // [G, RR] 1 / row_scale of each routing row
  std::vector<int64_t> bounds;  // the parts: [bounds[p], bounds[p + 1]) of the chunk's keys
  at::Tensor q, out, lse, doc_max, doc_lse, gold_out, route_max, route_sum;

  Call(const at::Tensor& q_in, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& key_doc,
       int64_t docs, const at::Tensor& stat_rows, const at::Tensor& gold_mask, double scale,
       const std::optional<at::Tensor>& row_scale_in, const std::optional<at::Tensor>& route_rows_in,
       const std::optional<at::Tensor>& route_group_in, int64_t row_multiple = 1)
      : n_docs(docs) {
    const at::Tensor none = at::empty({0}, at::kLong);  // an argument not given: empty
    const at::Tensor& row_scale = row_scale_in ? *row_scale_in : none;
    const at::Tensor& route_rows = route_rows_in ? *route_rows_in : none;
    const at::Tensor& route_group = route_group_in ? *route_group_in : none;
    TORCH_CHECK(q_in.dim() == 3 && keys.dim() == 3 && values.dim() == 3, "decode_attention: 3-d q, keys, values");
    G = keys.size(0), T = keys.size(1), D = keys.size(2), R = q_in.size(1);
    TORCH_CHECK(q_in.size(0) == G && q_in.size(2) == D && values.size(0) == G && values.size(1) == T &&
                values.size(2) == D, "decode_attention: shapes of q, keys, values disagree");
    TORCH_CHECK(D == 32 || D == 64 || D == 128, "decode_attention: head dim must be 32, 64 or 128");
    TORCH_CHECK(keys.stride(2) == 1 && keys.stride(1) == D && values.stride(2) == 1 && values.stride(1) == D,
                "decode_attention: keys and values rows must be contiguous");
    stats = key_doc.numel() > 0 && stat_rows.numel() > 0;
    S = stats ? stat_rows.size(0) : 0;
    const bool has_gold = stats && gold_mask.numel() > 0;
    q = q_in.contiguous();
    auto f32 = at::TensorOptions().dtype(at::kFloat);
    out = at::empty({G, R, D}, f32);
    lse = at::empty({G, R}, f32);
    doc_max = at::full({G, S, stats ? n_docs : 0}, kNegInf, f32);
    doc_lse = at::full({G, S, stats ? n_docs : 0}, kNegInf, f32);
    gold_out = at::zeros({G, S, D}, f32);

    // key_doc, when given, also places the parts' boundaries (at document starts) with or
    // without statistics: a row's summation order then does not depend on what other rows ask for
    TORCH_CHECK(key_doc.numel() == 0 ||
                    (key_doc.numel() == T && key_doc.scalar_type() == at::kLong && key_doc.is_contiguous()),
                "decode_attention: key_doc must be empty or int64 [T], contiguous");
    kd = key_doc.numel() > 0 ? key_doc.data_ptr<int64_t>() : nullptr;
    TORCH_CHECK(!has_gold || (gold_mask.dim() == 2 && gold_mask.size(0) == S && gold_mask.size(1) == n_docs &&
                              gold_mask.is_contiguous()),
                "decode_attention: gold_mask must be bool [stat rows, n_docs]");
    srow.resize(S);
    for (int64_t s = 0; s < S; ++s) {
      srow[s] = stat_rows.data_ptr<int64_t>()[s];
      TORCH_CHECK(srow[s] >= 0 && srow[s] < R, "decode_attention: stat row ", srow[s], " outside 0..", R - 1);
    }
    gmask = has_gold ? gold_mask.data_ptr<bool>() : nullptr;

    TORCH_CHECK(row_scale.numel() == 0 || (row_scale.scalar_type() == at::kFloat && row_scale.dim() == 2 &&
                                           row_scale.size(0) == G && row_scale.size(1) == R && row_scale.is_contiguous()),
                "decode_attention: row_scale must be empty or fp32 [G, R], contiguous");
    R_pad = (R + row_multiple - 1) / row_multiple * row_multiple;
    rscale.assign(G * R_pad, 0.f);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t r = 0; r < R; ++r)
        rscale[g * R_pad + r] = (float)scale * (row_scale.numel() ? row_scale.data_ptr<float>()[g * R + r] : 1.f);

    route = key_doc.numel() > 0 && route_rows.numel() > 0;
    RR = route ? route_rows.numel() : 0;
    TORCH_CHECK(!route || (route_rows.scalar_type() == at::kLong && route_group.scalar_type() == at::kLong &&
                           route_group.numel() == RR && route_rows.is_contiguous() && route_group.is_contiguous()),
                "decode_attention: route_rows and route_group must be int64 of one length");
    for (int64_t j = 0; j < RR; ++j) {
      rrow.push_back(route_rows.data_ptr<int64_t>()[j]);
      rgroup.push_back(route_group.data_ptr<int64_t>()[j]);
      TORCH_CHECK(rrow[j] >= 0 && rrow[j] < R, "decode_attention: route row ", rrow[j], " outside 0..", R - 1);
      TORCH_CHECK(rgroup[j] >= 0, "decode_attention: route group ", rgroup[j], " < 0");
      n_groups = std::max(n_groups, rgroup[j] + 1);
    }
    rfactor.resize(G * RR);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < RR; ++j) {
        const float rs = row_scale.numel() ? row_scale.data_ptr<float>()[g * R + rrow[j]] : 1.f;
        TORCH_CHECK(rs > 0.f && std::isfinite(rs), "decode_attention: route row ", rrow[j], "'s row_scale ", rs,
                    " is not positive and finite (its raw scores cannot be recovered)");
        rfactor[g * RR + j] = 1.f / rs;
      }
    if (route) {
      int64_t hi = -1;
      d_lo = n_docs;
      for (int64_t t = 0; t < T; ++t)
        if (kd[t] >= 0) d_lo = std::min(d_lo, kd[t]), hi = std::max(hi, kd[t]);
      width = hi >= d_lo ? hi - d_lo + 1 : 0;
      if (!width) d_lo = 0;
    }
    route_max = at::full({G, n_groups, width}, kNegInf, f32);
    route_sum = at::zeros({G, RR, width}, f32);

    // parts of the chunk, starting at document boundaries when key_doc is given; with
    // statistics each document's keys must be one run (so one task owns each document's statistics)
    // at least four tasks per thread, and (where the chunk is long enough) as many for each thread
    const int64_t threads = at::get_num_threads();
    int64_t want = (4 * threads + G - 1) / G;
    while ((G * want) % threads) ++want;
    int64_t n_parts = std::max<int64_t>(1, std::min<int64_t>(want, T / 2048));
    bounds = {0};
    for (int64_t p = 1; p < n_parts; ++p) {
      int64_t t = T * p / n_parts;
      if (kd) while (t < T && t > 0 && kd[t] == kd[t - 1]) ++t;
      if (t > bounds.back() && t < T) bounds.push_back(t);
    }
    bounds.push_back(T);
    if (stats || route) {
      std::vector<uint8_t> seen(n_docs, 0);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t d = kd[t];
        TORCH_CHECK(d < n_docs, "decode_attention: key_doc ", d, " >= n_docs ", n_docs);
        if (d >= 0 && (t == 0 || kd[t - 1] != d)) {
          TORCH_CHECK(!seen[d], "decode_attention: document ", d, "'s keys are not one run");
          seen[d] = 1;
        }
      }
    }
  }

  int64_t n_parts() const { return (int64_t)bounds.size() - 1; }

  // Routing scores of one run of document d's keys in a block (scores sc [rows][ld], the run at
  // columns i..e-1, each row already times its row_scale) for KV head g; max_of and sum_of are the
  // kernel's own max and sum over n floats.  A task owns its documents, so no two tasks write one
  // slot.
  template <typename MaxOf, typename SumOf>
  void route_run(int64_t g, int64_t d, const float* sc, int64_t ld, int i, int e, const MaxOf& max_of,
                 const SumOf& sum_of) {
    float* rm = route_max.data_ptr<float>() + g * n_groups * width + (d - d_lo);
    float* rsum = route_sum.data_ptr<float>() + g * RR * width + (d - d_lo);
    const float* f = rfactor.data() + g * RR;
    for (int64_t j = 0; j < RR; ++j) {
      const float* row = sc + rrow[j] * ld + i;
      float* slot = rm + rgroup[j] * width;
      *slot = std::max(*slot, max_of(row, e - i) * f[j]);
      rsum[j * width] += sum_of(row, e - i) * f[j];
    }
  }

  // The parts of each KV head (parts[g * n_parts + p]) into out, lse and gold_out.
  void combine(const std::vector<Partial>& parts) {
    const int64_t P = n_parts();
    float* o = out.data_ptr<float>();
    float* ls = lse.data_ptr<float>();
    float* go = gold_out.data_ptr<float>();
    std::vector<float> w(P);
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t r = 0; r < R; ++r) {
        float M = kNegInf;
        for (int64_t p = 0; p < P; ++p) M = std::max(M, parts[g * P + p].m[r]);
        float L = 0.f;
        float* orow = o + (g * R + r) * D;
        std::fill(orow, orow + D, 0.f);
        for (int64_t p = 0; p < P; ++p) {
          const Partial& part = parts[g * P + p];
          w[p] = part.m[r] == kNegInf ? 0.f : std::exp(part.m[r] - M);
          L += part.l[r] * w[p];
          for (int64_t j = 0; j < D; ++j) orow[j] += part.acc[r * D + j] * w[p];
        }
        for (int64_t j = 0; j < D; ++j) orow[j] /= L;
        ls[g * R + r] = M + std::log(L);
        for (int64_t s = 0; s < S; ++s) {
          if (srow[s] != r) continue;
          float* grow = go + (g * S + s) * D;
          for (int64_t p = 0; p < P; ++p)
            for (int64_t j = 0; j < D; ++j) grow[j] += parts[g * P + p].gold[s * D + j] * w[p];
          for (int64_t j = 0; j < D; ++j) grow[j] /= L;
        }
      }
    }
  }

  std::vector<at::Tensor> results() const {
    return {out, lse, doc_max, doc_lse, gold_out, route_max, route_sum, at::full({}, d_lo, at::TensorOptions().dtype(at::kLong))};
  }
};

}  // namespace lens
