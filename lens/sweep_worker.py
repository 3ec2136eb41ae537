"""One process's share of a sweep: a loaded model and its runner, turning units into record
frames.  The single-process sweep holds one; a Ray sweep (:mod:`lens.ray_sweep`) holds one per
actor.  A unit's frame depends only on the unit (and the thread count: PyTorch's CPU kernels
split sums by thread), so any worker gives the same bits for it."""

from __future__ import annotations

import time

import pandas as pd
import torch

from kernels.spec import parse_intervention
from lens.errors import LensError
from lens.metrics import head_rows, layer_rows, query_row
from lens.runtime.ranking import rank_by_exclusion, run_in_order


class SweepWorker:
    def __init__(self, cfg, data=None, progress: bool = True, threads: int | None = None, shared_kv: bool = False):
        """``cfg``: a :class:`lens.sweep.SweepConfig` with its content keys set; ``data``: the
        dataset when the caller holds it (else loaded from ``cfg`` and checked against its key);
        ``shared_kv``: other workers may be building the same disk KV cache (wait for them)."""
        from lens.models.backends import load_model
        from lens.models.registry import weights_fingerprint
        from lens.runtime import make_runner

        if threads is not None:
            torch.set_num_threads(threads)
        options = cfg.options()
        if data is None:
            data = options.dataset(cfg.dataset)
            if cfg.dataset_sha256 and data.content_hash() != cfg.dataset_sha256:
                raise LensError(f"dataset {cfg.dataset!r} differs here from the driver's (content hash); "
                                "a worker must see the same files (shared storage)")
            if cfg.model_fingerprint and weights_fingerprint(cfg.model) != cfg.model_fingerprint:
                raise LensError(f"model {cfg.model!r} differs here from the driver's (weights fingerprint); "
                                "install the same weights on every worker")
        self.cfg, self.data = cfg, data
        self.score_fns = [parse_intervention(s) for s in cfg.interventions]
        self.specs = [fn.spec() for fn in self.score_fns]
        model = load_model(cfg.model, dtype=options.torch_dtype(), backend=cfg.backend or "lens")
        self.layout = options.layout(model)
        # a unit's streams are fixed by the sweep's arguments (resumed, or on Ray, the same), so their
        # dense layers run as one batch
        self.runner = make_runner(model, data, self.layout, seed=cfg.seed, progress=progress, kv=cfg.kv, batch_dense=True,
                                  kv_wait=shared_kv)
        from lens.runtime.timing import Breakdown

        self.breakdown = Breakdown(self.runner)

    def streams(self, n: int, query_ids: list[str]):
        """A unit's streams (every intervention over every query), each checked as it is made."""
        return [self.runner.stream(q, n, fn) for fn in self.score_fns for q in query_ids]

    def check(self, units: list[tuple[int, list[str]]]) -> dict:
        """Make every unit's streams (corpus, route layer, layers and heads checked) before anything
        is written; the layout's facts for ``layout.json``."""
        for n, query_ids in units:
            self.streams(n, query_ids)
        return dict(truncated_documents=self.runner.pool.truncated, max_doc_tokens=self.layout.max_doc_tokens,
                    code_position=self.layout.code_position)

    def run(self, n: int, query_ids: list[str], desc: str | None = None) -> pd.DataFrame:
        return self.run_timed(n, query_ids, desc)[0]

    def run_timed(self, n: int, query_ids: list[str], desc: str | None = None) -> tuple[pd.DataFrame, dict]:
        """A unit's frame and where its time went (:mod:`lens.runtime.timing`)."""
        self.breakdown.reset()
        t0 = time.perf_counter()
        streams = self.streams(n, query_ids)
        runs = run_in_order(self.runner, streams, desc=desc, beam=self.cfg.beam)
        if self.cfg.ranking == "exclude":
            rank_by_exclusion(self.runner, streams, runs, self.cfg.beam, self.cfg.beam, desc=desc)
        timing = dict(n=n, queries=len(query_ids), interventions=len(self.specs), seconds=time.perf_counter() - t0,
                      threads=torch.get_num_threads(), **self.breakdown.spent)
        return unit_rows(runs, self.specs), timing

    def baseline(self, query_ids: list[str], sizes: list[int], progress: bool = True) -> pd.DataFrame:
        from lens.baseline import minilm_rows

        return minilm_rows(self.data, self.runner, query_ids, sizes, progress=progress)


def unit_rows(runs, specs: list[str]) -> pd.DataFrame:
    """A unit's tidy rows: per run one query row, a row per layer and a row per (layer, head)."""
    rows = []
    for run in runs:
        spec = next(s for s in specs if s == run.intervention)
        key = dict(query_id=run.query_id, n_docs=run.n_docs, intervention=spec)
        rows.append(dict(level="query", **key, layer=-1, head=-1, **query_row(run)))
        rows += [dict(level="layer", **key, head=-1, **r) for r in layer_rows(run)]
        rows += [dict(level="head", **key, **r) for r in head_rows(run)]
    return pd.DataFrame(rows)


class LocalUnits:
    """A sweep's units in this process (the default; :class:`lens.ray_sweep.RayUnits` on Ray)."""

    def __init__(self, cfg, data, progress: bool):
        self.worker, self.progress = SweepWorker(cfg, data, progress), progress

    def check(self, units):
        return self.worker.check(units)

    def run(self, todo):
        for n, b, query_ids in todo:
            yield (n, b), *self.worker.run_timed(n, query_ids, desc=f"N={n} batch {b}")

    def baseline(self, query_ids, sizes):
        return self.worker.baseline(query_ids, sizes, progress=self.progress)

    def close(self) -> None:
        pass
