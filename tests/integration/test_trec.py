"""A sweep's rankings exported as TREC files give, through ir-measures (pytrec_eval), the same
Recall@k / hit@k lens reports, and the dense baseline's nDCG@10 and MRR@10."""

import json

import ir_measures
import pytest
from ir_measures import RR, R, Success, nDCG

from lens.sweep import SweepConfig, run_sweep
from lens.trec import write_trec


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("trec") / "sweep"
    cfg = SweepConfig(model="tiny-llama", dataset="limit-pairs:docs=16,queries=12", n=[8, 16], queries=12, batch=6,
                      interventions=["none", "temperature:t=0.5"], baseline="minilm", dtype="float32")
    run_sweep(cfg, out, progress=False)
    return out


def _measure(folder, name, measures):
    qrels = list(ir_measures.read_trec_qrels(str(folder / "qrels.txt")))
    run = list(ir_measures.read_trec_run(str(folder / name)))
    return ir_measures.calc_aggregate(measures, qrels, run)


def test_ir_measures_on_the_exported_runs_equal_lens_rates(sweep, tmp_path):
    paths = write_trec(sweep, tmp_path / "trec")
    assert {p.name for p in paths} >= {"qrels.txt", "none.n8.run", "temperature_t=0.5.n16.run", "all-MiniLM-L6-v2.n16.run"}
    summary = json.loads((sweep / "summary.json").read_text())
    for entry in summary["runs"]:
        name = entry["intervention"].replace(":", "_") + f".n{entry['n_docs']}.run"
        got = _measure(tmp_path / "trec", name, [R @ 1, R @ 2, Success @ 1, Success @ 2])
        for k in ("1", "2"):
            assert got[R @ int(k)] == pytest.approx(entry["recall_at_k"][k], abs=1e-9)
            assert got[Success @ int(k)] == pytest.approx(entry["hit_at_k"][k], abs=1e-9)
    base = summary["baseline"]
    for n in ("8", "16"):
        got = _measure(tmp_path / "trec", f"all-MiniLM-L6-v2.n{n}.run", [nDCG @ 10, RR @ 10, R @ 2, Success @ 1])
        assert got[nDCG @ 10] == pytest.approx(base["ndcg_at_10"][n], abs=1e-9)
        assert got[RR @ 10] == pytest.approx(base["mrr_at_10"][n], abs=1e-9)
        assert got[R @ 2] == pytest.approx(base["recall_at_k"][n]["2"], abs=1e-9)
        assert got[Success @ 1] == pytest.approx(base["hit_at_k"][n]["1"], abs=1e-9)
        low, high = base["ndcg_at_10_ci"][n]
        assert low <= base["ndcg_at_10"][n] <= high
