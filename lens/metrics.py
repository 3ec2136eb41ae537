"""The dilution metrics, computed from the kernels' per-document statistics of one
:class:`~lens.runtime.records.QueryRun` (never from a T x T pattern).  Definitions: docs/records.md.

Choices made here (documented in the README):
* readout token: the last query-block token (it predicts the first code digit);
* several gold documents (LIMIT has two): rank metrics ask for *a* gold document first (the
  best-scoring gold), mass metrics use the union of the gold documents;
* Delta = best gold MaxSim - mean distractor MaxSim (distractors attended at that layer);
  Delta_lse = the same gap on per-document log-mass (logsumexp of the document's scores);
  predicted gold mass 1 / (1 + (N-1) exp(-Delta)) from either gap, beside the measured mass
  (it ignores the instruction and query tokens' share).  Under SSMax with n = docs the scores
  are already multiplied by s log N, so the same formula is the SSMax form 1/(1+(N-1) N^(-s Delta_raw)).
* routing recall@B, for every router: the best gold document is among the B with the highest
  routing score, by QK-MaxSim (the max of q.k over the document's keys) and by mean key
  (q . mean K_doc), each a max over query tokens, reduced over heads by max and by mean.

Record columns are plain names (``recall_at_2``, ``hit_at_1``, ``ndcg_at_10``,
``routing_hit_maxsim_max_at_8``) and code lists are list columns; :func:`read_records` reads
records of either format (the first one joined codes with "|" and named columns ``recall@2``).
"""

from __future__ import annotations

import math
import re

import pandas as pd
import torch

from lens.runtime.records import QueryRun

ROUTING_B = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
RECALL_K = (1, 2, 5, 10)
MASS_RECALL_K = (2, 5, 10)  # Recall@k of the ranking by attention mass, per layer (k = 1 is R_sum)
ROUTERS = ("maxsim", "meankey", "chunkmean")  # the order of QueryRun.route_scores' rows (each reduced by max, then mean)
REDUCES = ("max", "mean")
RECORDS_FORMAT = 2


def rate_col(name: str, k: int) -> str:
    """``recall_at_2``, ``hit_at_1``, ``ndcg_at_10``, ``mrr_at_10``."""
    return f"{name}_at_{k}"


def routing_col(router: str, reduce: str, b: int) -> str:
    return f"routing_hit_{router}_{reduce}_at_{b}"


def routing_cols(columns, router: str = "maxsim", reduce: str = "max") -> list[tuple[int, str]]:
    """(B, column) of one router's routing-recall columns, by B."""
    pattern = re.compile(re.escape(f"routing_hit_{router}_{reduce}_at_") + r"(\d+)")
    found = [(int(m.group(1)), c) for c in columns if (m := pattern.fullmatch(c))]
    return sorted(found)


def upgrade_records(frame: pd.DataFrame) -> pd.DataFrame:
    """Records of the first format (columns ``recall@2``, ``routing_hit_max@8``; codes joined with
    "|") in today's names and list columns; today's records pass unchanged."""
    rename = {}
    for c in frame.columns:
        if m := re.fullmatch(r"routing_hit_(max|mean)@(\d+)", c):
            rename[c] = routing_col("maxsim", m.group(1), int(m.group(2)))
        elif m := re.fullmatch(r"(recall|hit|ndcg|mrr)@(\d+)", c):
            rename[c] = rate_col(m.group(1), int(m.group(2)))
    frame = frame.rename(columns=rename) if rename else frame
    for col in ("gold_codes", "ranked_codes"):
        if col in frame.columns and frame[col].map(lambda v: isinstance(v, str)).any():
            frame = frame.assign(**{col: frame[col].map(lambda v: [c for c in v.split("|") if c] if isinstance(v, str) else v)})
    return frame


def read_records(path, columns: list[str] | None = None, filters=None) -> pd.DataFrame:
    """A records.parquet (or a sweep's part) of either format, in today's columns."""
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    if columns is not None and not set(columns) <= set(names):
        old = {rate_col(m.group(1), int(m.group(2))): c for c in names if (m := re.fullmatch(r"(recall|hit|ndcg|mrr)@(\d+)", c))}
        columns = [old.get(c, c) for c in columns]
    return upgrade_records(pd.read_parquet(path, columns=columns, filters=filters))


def predicted_gold_mass(delta: float, n_docs: int) -> float:
    """1 / (1 + (N-1) exp(-Delta)): a gold document Delta above N-1 identical distractors."""
    if n_docs <= 1:
        return 1.0
    return 1.0 / (1.0 + (n_docs - 1) * math.exp(-delta)) if delta > -700 else 0.0


def ssmax_predicted_gold_mass(delta_raw: float, n_docs: int, s: float) -> float:
    """1 / (1 + (N-1) N^(-s Delta)): the same with SSMax (n = N documents)."""
    return predicted_gold_mass(s * math.log(max(n_docs, 1)) * delta_raw, n_docs)


def recall_at_k(ranked_codes: list[str], gold_codes: list[str], k: int) -> float:
    """|top-k codes ∩ gold| / |gold| (the BEIR/MTEB definition)."""
    return len(set(ranked_codes[:k]) & set(gold_codes)) / len(gold_codes)


def hit_at_k(ranked_codes: list[str], gold_codes: list[str], k: int) -> bool:
    return bool(set(ranked_codes[:k]) & set(gold_codes))


def ndcg_at_k(ranked_codes: list[str], gold_codes: list[str], k: int = 10) -> float:
    """nDCG@k with binary gains (every judged document relevant 1), log2 discounts."""
    gold = set(gold_codes)
    dcg = sum(1.0 / math.log2(i + 2) for i, c in enumerate(ranked_codes[:k]) if c in gold)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(k, len(gold))))
    return dcg / ideal


def mrr_at_k(ranked_codes: list[str], gold_codes: list[str], k: int = 10) -> float:
    """1 / rank of the first relevant code within the top k, else 0."""
    gold = set(gold_codes)
    return next((1.0 / (i + 1) for i, c in enumerate(ranked_codes[:k]) if c in gold), 0.0)


def head_rows(run: QueryRun) -> list[dict]:
    """One row per layer x head: gold MaxSim, its rank, Delta, gold mass and the theory."""
    gold = torch.tensor(run.gold_positions)
    is_gold = torch.zeros(run.n_docs, dtype=torch.bool)
    is_gold[gold] = True
    rows = []
    for layer, res in enumerate(run.layers):
        doc_max = res.doc_max[:, 0]  # [head, N]
        doc_lse = res.doc_lse[:, 0]
        attended = torch.isfinite(doc_max)  # routing leaves documents out after its layer
        mass = res.document_mass()
        gold_max = doc_max[:, gold].amax(-1)
        gold_lse = doc_lse[:, gold].amax(-1)
        distractor = attended & ~is_gold
        n_attended = int(attended[0].sum())
        for h in range(doc_max.shape[0]):
            dist_max, dist_lse = doc_max[h, distractor[h]], doc_lse[h, distractor[h]]
            delta = float(gold_max[h] - dist_max.mean()) if dist_max.numel() else math.nan
            delta_lse = float(gold_lse[h] - dist_lse.mean()) if dist_lse.numel() else math.nan
            rows.append(dict(
                layer=layer, head=h,
                gold_maxsim=float(gold_max[h]),
                gold_rank=1 + int((dist_max > gold_max[h]).sum()),
                delta=delta, delta_lse=delta_lse,
                gold_mass=float(mass[h, gold].sum()),
                pred_mass_maxsim=predicted_gold_mass(delta, n_attended) if not math.isnan(delta) else math.nan,
                pred_mass_lse=predicted_gold_mass(delta_lse, n_attended) if not math.isnan(delta_lse) else math.nan,
            ))
    return rows


def layer_rows(run: QueryRun, routing_b: tuple[int, ...] = ROUTING_B) -> list[dict]:
    """One row per layer: R_sum / R_any hits, GoldShare, logit-lens first digit, routing recall."""
    gold = run.gold_positions
    first_digits = {int(run.codes[g][0]) for g in gold}
    rows = []
    for layer, res in enumerate(run.layers):
        doc_max = res.doc_max[:, 0]
        mass = res.document_mass()  # [head, N]
        attn_norm = float(run.attn_out[layer].norm())
        gold_norm = float(run.gold_attn_out[layer].norm())
        row = dict(
            layer=layer,
            r_sum_hit=int(mass.sum(0).argmax()) in gold,
            r_any_hit=any(int(doc_max[h].argmax()) in gold for h in range(doc_max.shape[0])),
            gold_share=gold_norm / attn_norm if attn_norm > 0 else math.nan,
            attn_norm=attn_norm, gold_attn_norm=gold_norm,
            layer_gold_mass=float(mass[:, gold].sum(-1).mean()),  # head-mean of the gold mass
            first_digit_hit=int(run.logit_lens[layer].argmax()) in first_digits,
        )
        # Recall@k of the documents ranked by their head-summed mass (R_sum's ranking, read to k)
        by_mass = torch.argsort(mass.sum(0), descending=True, stable=True).tolist()
        n_attended = int(torch.isfinite(doc_max[0]).sum())
        for k in MASS_RECALL_K:
            if k <= n_attended:
                row[rate_col("mass_recall", k)] = recall_at_k(by_mass, gold, k)
        scores = [] if run.route_scores is None else run.route_scores[layer]  # [routers x reduces, N]
        for i, values in enumerate(scores):  # older runs may carry fewer routers
            router, reduce = ROUTERS[i // len(REDUCES)], REDUCES[i % len(REDUCES)]
            order = torch.argsort(values, descending=True)
            best_gold_rank = min(int((order == g).nonzero()) for g in gold)  # 0-based
            for b in routing_b:
                if b <= run.n_docs:
                    row[routing_col(router, reduce, b)] = best_gold_rank < b
        rows.append(row)
    return rows


def run_failed(run: QueryRun) -> bool:
    """A run whose numbers are not numbers (NaN or infinite logits or softmax denominators):
    recorded as failed, never scored."""
    tensors = [run.readout_logits, run.digit_logprobs.nan_to_num(neginf=0.0)] + [l.lse for l in run.layers]
    return not all(bool(torch.isfinite(t).all()) for t in tensors)


def query_row(run: QueryRun, recall_k: tuple[int, ...] = RECALL_K) -> dict:
    gold_codes = run.gold_codes
    failed = run_failed(run)
    row = dict(
        decoded=run.decoded, gold_codes=list(gold_codes), ranked_codes=list(run.ranked_codes),
        tokens=run.n_tokens, correct=run.correct and not failed, failed=failed,
        routed_gold=None if run.routed is None else bool(set(run.routed) & set(run.gold_positions)),
    )
    for k in recall_k:
        if failed:  # left out of every rate (NaN), counted in the summary's "failed"
            row[rate_col("recall", k)] = row[rate_col("hit", k)] = math.nan
        elif k <= len(run.ranked_codes):
            row[rate_col("recall", k)] = recall_at_k(run.ranked_codes, gold_codes, k)
            row[rate_col("hit", k)] = hit_at_k(run.ranked_codes, gold_codes, k)
    return row
