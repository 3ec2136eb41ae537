"""The API the Streamlit app stands on: defaults, composing interventions from controls, and
per-query views.  Every number the app shows is computed here or in lens.metrics."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import torch

from kernels.score_functions import INTERVENTIONS, Intervention
from lens.runtime import BlockSearchRunner, QueryRun
from lens.metrics import head_rows, layer_rows, query_row, rate_col
from lens.paths import cache_dir

DEFAULT_DATASET = "limit-pairs:docs=256,core=16"  # LIMIT's design over 16 documents among 240 others (docs/datasets.md)
DEFAULT_N = "16,64,256"


def default_model() -> str:
    """blocksearch-135m once it is registered and present, else smollm2-135m."""
    from lens.models.registry import REGISTRY

    entry = REGISTRY.get("blocksearch-135m")
    return "blocksearch-135m" if entry is not None and entry.weights_present() else "smollm2-135m"


def records_folder(model: str, dataset: str, sizes: list[int], queries: int, dtype: str = "auto") -> Path:
    """The app's own records folder for a sweep: one per model, dataset, sizes, queries and dtype
    (``auto`` resolved, so a folder never holds records of two dtypes)."""
    from lens.backend import resolve_dtype

    resolved = str(resolve_dtype(dtype)).removeprefix("torch.")
    key = hashlib.sha256(json.dumps([model, dataset, sizes, queries, resolved]).encode()).hexdigest()[:12]
    return cache_dir() / "records" / f"app-{resolved}-{key}"


def intervention_from_controls(chosen: dict[str, dict]) -> Intervention:
    """The lab's controls as one intervention: {registered name: {field: value}} for each one
    switched on, composed in the registry's order (the same objects the CLI parses from specs)."""
    out = Intervention()
    for name, cls in INTERVENTIONS.items():
        if name in chosen:
            out = out + cls(**chosen[name])
    return out


def layer_table(run: QueryRun) -> pd.DataFrame:
    """Per layer: head-mean gold mass, best head's gold mass, R_sum/R_any hits, GoldShare,
    best gold rank, first-digit logit lens."""
    heads = pd.DataFrame(head_rows(run))
    layers = pd.DataFrame(layer_rows(run))
    agg = heads.groupby("layer").agg(gold_mass=("gold_mass", "mean"), best_head_gold_mass=("gold_mass", "max"),
                                     best_gold_rank=("gold_rank", "min"), delta=("delta", "mean"))
    cols = ["layer", "r_sum_hit", "r_any_hit", "gold_share", "first_digit_hit"]
    return layers[cols].merge(agg.reset_index(), on="layer")


def ranked_by_exclusion(runner: BlockSearchRunner, query_id: str, n_docs: int, k: int = 2) -> list[str]:
    """The query's top ``k`` codes by exclusion (lens.runtime.ranking): the beam's best, then each
    next best with the ones before it hidden; k query passes, none recorded."""
    from lens.runtime.ranking import rank_by_exclusion

    stream = runner.stream(query_id, n_docs, record=False, route_scores=False)
    run = runner.run_streams([stream], beam=2)[0]
    return rank_by_exclusion(runner, [stream], [run], k=k, beam=2)[0].ranked_codes


def top_documents(runner: BlockSearchRunner, run: QueryRun, layer: int, k: int = 5) -> pd.DataFrame:
    """The k documents with the highest attention mass (summed over heads) at one layer."""
    res = run.layers[layer]
    mass = res.document_mass().sum(0)  # [N], summed over heads
    top = torch.argsort(mass, descending=True)[:k].tolist()
    return pd.DataFrame([
        dict(rank=i + 1, code=run.codes[j], gold=j in run.gold_positions, mass_sum_heads=float(mass[j]),
             max_maxsim=float(res.doc_max[:, 0, j].max()), text=runner.dataset.documents[run.corpus[j]].text)
        for i, j in enumerate(top)
    ])


def maxsim_distribution(run: QueryRun, layer: int) -> pd.DataFrame:
    """Every document's MaxSim per head at one layer, marked gold or distractor (for the
    'score stays high, mass collapses' picture)."""
    res = run.layers[layer]
    doc_max, mass = res.doc_max[:, 0], res.document_mass()
    rows = []
    for h in range(doc_max.shape[0]):
        for j in range(run.n_docs):
            if torch.isfinite(doc_max[h, j]):
                rows.append(dict(head=h, doc=j, gold=j in run.gold_positions, maxsim=float(doc_max[h, j]),
                                 mass=float(mass[h, j])))
    return pd.DataFrame(rows)


def code_margin(run: QueryRun) -> float | None:
    """Log-probability gap between the run's top two ranked codes (None with fewer than two).
    Only the codes the beam kept are compared.  On a model not trained for the task (SmolLM2)
    the digit distributions are flat, and bf16 rounding alone moves them by up to ~0.1 nats a
    digit (``bench_kernels.py --part rerun`` feeds one corpus in two chunk sizes and prints how
    the codes move), so a small margin says the decoded code is not firm."""
    if len(run.ranked_logprobs) < 2:
        return None
    return float(run.ranked_logprobs[0] - run.ranked_logprobs[1])


def compare_runs(before: list[QueryRun], after: list[QueryRun]) -> dict:
    """Before/after an intervention over the same queries: per-layer means and recall."""
    def summary(runs):
        tables = pd.concat([layer_table(r) for r in runs])
        per_layer = tables.groupby("layer")[["gold_mass", "r_sum_hit", "r_any_hit", "gold_share"]].mean()
        rows = [query_row(r) for r in runs]
        return per_layer, dict(hit_at_1=sum(r[rate_col("hit", 1)] for r in rows if rate_col("hit", 1) in r) / len(rows),
                               decoded=[(r.query_id, r.decoded, "|".join(r.gold_codes)) for r in runs],
                               margin=[code_margin(r) for r in runs])
    (b_layers, b), (a_layers, a) = summary(before), summary(after)
    layers = b_layers.add_suffix("_before").join(a_layers.add_suffix("_after")).reset_index()
    return dict(layers=layers, before=b, after=a)
