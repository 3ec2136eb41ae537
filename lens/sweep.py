"""Resumable sweeps over corpus size N and interventions, written as tidy records.

``DIR/records.parquet`` has one row per query x N x intervention x layer x head
(``level == "head"``), one per query x N x intervention x layer (``level == "layer"``) and one
per query x N x intervention (``level == "query"``); with a dense baseline, ``level ==
"baseline"`` rows per query x N.  ``DIR/summary.json`` aggregates them.

Work is cut into units (one N, a batch of queries, every intervention: run together so a
disk-backed corpus is read once per layer for all of them).  Each finished unit is committed as
``DIR/parts/<unit>.parquet`` (written to a temporary name, then renamed), so a sweep killed at
any point and restarted with the same arguments redoes only the unit it was in: no lost and no
duplicated rows, and the same bits as an uninterrupted sweep (a unit's numbers depend only on the
unit: documents are prefilled in fixed batches, see :mod:`lens.runtime.prefill`).  ``DIR/sweep.json``
holds the arguments; other arguments into the same DIR are an error.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from kernels.spec import parse_intervention
from lens.errors import LensError
from lens.log import log, show_progress
from lens.paths import exclusive_lock
from lens.metrics import MASS_RECALL_K, RECALL_K, RECORDS_FORMAT, REDUCES, ROUTERS, rate_col, read_records, routing_cols
from lens.options import RunOptions, check_queries, check_sizes
from lens.runtime.ranking import check_ranking
from lens.stats import CONFIDENCE, rate_interval
from lens.sweep_worker import LocalUnits

SWEEP_FORMAT = RECORDS_FORMAT  # 2: list columns for codes, plain column names (no '@')


@dataclass
class SweepConfig:
    model: str
    dataset: str
    n: list[int]
    queries: int
    interventions: list[str] = field(default_factory=lambda: ["none"])
    baseline: str | None = None
    seed: int = 0
    beam: int = 2
    ranking: str | None = None  # None: the beam's order; "exclude": each next code with the ones before it hidden
    positions: str = "shared"
    code_position: str | None = None  # None: the model's own (blocksearch-135m: end)
    max_doc_tokens: int | None = None  # None: the model's own (LayoutConfig.for_model), else 256
    truncate: bool = False
    drop_unjudged: bool = False
    dtype: str = "auto"  # auto: lens.backend decides (bf16 only with native bf16 matmuls)
    kv: str = "memory"
    batch: int = 8  # queries per unit
    split: str | None = None  # a BEIR folder's qrels split (None: test)
    backend: str | None = None  # None: lens's own engine; "nnsight": any transformers model, dense (small N)
    dataset_sha256: str | None = None  # set by run_sweep from the data itself: an edited dataset is not resumed
    model_fingerprint: str | None = None  # set by run_sweep from the weights' files: edited weights are not resumed

    def options(self) -> RunOptions:
        return RunOptions(dtype=self.dtype, seed=self.seed, positions=self.positions, code_position=self.code_position,
                          max_doc_tokens=self.max_doc_tokens, truncate=self.truncate, drop_unjudged=self.drop_unjudged,
                          split=self.split)


def _finite(value):
    """NaN and infinities are not JSON: they become null (the metric could not be computed)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_finite(data), indent=1, sort_keys=False, allow_nan=False))
    os.replace(tmp, path)


def _write_parquet_atomic(path: Path, frame: pd.DataFrame, metadata: dict | None = None) -> None:
    """Written under a temporary name, then renamed; ``metadata`` joins the file's schema metadata."""
    tmp = path.with_name(f".{path.name}.tmp")
    if metadata is None:
        frame.to_parquet(tmp, index=False)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(frame, preserve_index=False)
        pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata}), tmp)
    os.replace(tmp, path)


def _lens_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lens")
    except PackageNotFoundError:
        return "unknown"


def _write_records(path: Path, records: pd.DataFrame, cfg: SweepConfig, backend: dict) -> None:
    """records.parquet: the rows, with the columns that let sweeps be concatenated (model,
    dataset, dtype, backend, lens_version) and the schema in the file's metadata."""
    engine = "nnsight" if cfg.backend == "nnsight" else backend.get("kernel", "")
    frame = records.assign(model=cfg.model, dataset=cfg.dataset, dtype=cfg.dtype, backend=engine,
                           lens_version=_lens_version())
    _write_parquet_atomic(path, frame, {b"lens_records_format": str(SWEEP_FORMAT).encode(),
                                        b"lens_sweep": json.dumps({"format": SWEEP_FORMAT, **asdict(cfg)}).encode()})


def _check_out(cfg: SweepConfig, out: Path) -> bool:
    """Refuse an --out that holds something else; True if it already holds this sweep.  Writes
    nothing (sweep.json is written only once every input has been checked)."""
    meta = out / "sweep.json"
    wanted = {"format": SWEEP_FORMAT, **asdict(cfg)}
    if meta.is_file():
        try:
            have = json.loads(meta.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            raise LensError(f"{meta}: unreadable (not JSON); it is not a lens sweep folder, choose another --out") from None
        if not isinstance(have, dict):
            raise LensError(f"{meta}: not a lens sweep.json; choose another --out")
        # a key missing on one side reads as None (a field added later, left at its default)
        diff = sorted(k for k in set(have) | set(wanted) if have.get(k) != wanted.get(k))
        changed = [k for k in ("dataset_sha256", "model_fingerprint") if k in diff and have.get(k) is not None]
        if changed:
            what = " and ".join({"dataset_sha256": "the dataset's content", "model_fingerprint": "the model's weights"}[k]
                                for k in changed)
            raise LensError(f"{out}: {what} changed since its sweep ran ({', '.join(changed)}), so its records are "
                            f"not this input's; choose another --out, or delete {out} to rerun")
        if diff == ["format"]:
            raise LensError(f"{out} holds a sweep an older lens wrote (records format {have.get('format')}; this lens writes "
                            f"{SWEEP_FORMAT}): its parts cannot be resumed; choose another --out, or delete {out} to rerun "
                            "(`lens report` and `lens trec` still read its records.parquet)")
        if diff:
            raise LensError(
                f"{out} holds a sweep with other arguments ({', '.join(f'{k}: {have.get(k)!r} there, {wanted.get(k)!r} now' for k in diff)}); "
                "rerun with the same arguments to resume, or choose another --out"
            )
        return True
    if out.is_dir() and any(out.iterdir()):
        raise LensError(f"{out} is not empty and holds no sweep; choose an empty or new --out folder")
    return False


def run_sweep(cfg: SweepConfig, out: str | Path, progress: bool = True, on_unit=None, ray: dict | None = None) -> dict:
    """Run (or resume) a sweep; returns the summary.  ``on_unit(done, total)`` reports progress.
    Everything is checked before anything is written; one sweep at a time writes into ``out``.
    ``ray``: run the units on a Ray cluster, ``dict(address=..., workers=None, threads=None)``
    (:class:`lens.ray_sweep.RayUnits`); the records are the same bits as without it."""
    out = Path(out).expanduser()
    progress = progress and show_progress()
    specs = [parse_intervention(s).spec() for s in cfg.interventions]
    if len(set(specs)) != len(specs):
        raise LensError(f"interventions repeat: {specs}")
    from lens.backend import dtype_name, resolve_dtype

    dtype = resolve_dtype(cfg.dtype)
    cfg = replace(cfg, dtype=dtype_name(dtype))  # the records name the dtype that ran, not "auto"
    if cfg.backend not in (None, "lens", "nnsight"):
        raise LensError(f"backend {cfg.backend!r}: choose lens or nnsight")
    cfg = replace(cfg, backend=None if cfg.backend == "lens" else cfg.backend)  # lens's own: as sweeps before it
    if cfg.backend == "nnsight" and cfg.kv != "memory":
        raise LensError("--kv disk: the nnsight backend keeps no KV cache (each pass runs the whole context); "
                        "use --kv memory, or --backend lens")
    if cfg.baseline not in (None, "minilm"):
        raise LensError(f"baseline {cfg.baseline!r}: the dense baseline available is 'minilm'")
    if cfg.beam < 1 or not cfg.n or min(cfg.n) < 1 or cfg.queries < 1 or cfg.batch < 1:
        raise LensError("--beam, every N, --queries and --batch must be >= 1")
    cfg = replace(cfg, ranking=check_ranking(cfg.ranking, cfg.beam))
    data = cfg.options().dataset(cfg.dataset)
    check_sizes(cfg.n, data)
    check_queries(cfg.queries, data)
    from lens.models.registry import weights_fingerprint

    cfg = replace(cfg, dataset_sha256=data.content_hash(), model_fingerprint=weights_fingerprint(cfg.model))
    if out.exists() and not out.is_dir():
        raise LensError(f"--out {out}: is a file, not a folder; choose a folder path")
    with exclusive_lock(out.parent / f".{out.name}.lock", f"--out {out}"):
        try:
            return _run_locked(cfg, out, data, specs, dtype, progress, on_unit, ray)
        except OSError as err:
            where = f" ({err.filename})" if err.filename else ""
            raise LensError(f"--out {out}: {err.strerror or err}{where}; fix the folder (space, permissions) "
                            "and rerun the same command to resume") from None


def _unit_part(path: Path, n: int, query_ids: list[str], specs: list[str]) -> pd.DataFrame | None:
    """A unit's committed part, or None when it must be (re)done: missing, unreadable, or holding
    other runs than exactly the unit's (query, intervention) pairs (a foreign file)."""
    if not path.is_file():
        return None
    frame = _read_part(path)
    if frame is None or "level" not in frame.columns:
        log.warning(f"{path} is unreadable; redoing that unit")
        return None
    runs = frame[frame.level == "query"]
    want = {(q, s) for q in query_ids for s in specs}
    if set(runs.n_docs) != {n} or set(zip(runs.query_id, runs.intervention)) != want or len(runs) != len(want):
        log.warning(f"{path} holds other runs than its unit (a foreign file?); redoing that unit")
        return None
    return frame


def _read_part(path: Path) -> pd.DataFrame | None:
    """A committed unit, or None if its file is unreadable (a torn or foreign file is redone)."""
    try:
        return read_records(path)
    except Exception:  # pyarrow raises several types for a damaged file
        return None


def _run_locked(cfg, out, data, specs, dtype, progress, on_unit, ray) -> dict:
    resuming = _check_out(cfg, out)
    parts = out / "parts"

    query_ids = [q.id for q in data.queries[: cfg.queries]]
    batches = [query_ids[i : i + cfg.batch] for i in range(0, len(query_ids), cfg.batch)]
    units = [(n, b) for n in sorted(cfg.n) for b in range(len(batches))]
    done = {(n, b): _unit_part(parts / f"n{n}-b{b}.parquet", n, batches[b], specs) for n, b in units}
    todo = [unit for unit in units if done[unit] is None]
    baseline = _read_part(parts / "baseline.parquet") if cfg.baseline else None
    need_baseline = cfg.baseline and baseline is None
    ran: list[dict] = []
    if todo or need_baseline:
        if ray is None:
            executor = LocalUnits(cfg, data, progress)
        else:
            from lens.ray_sweep import RayUnits

            executor = RayUnits(cfg, **ray)
        try:
            # every stream is made (its corpus, route layer, layers and heads checked) before anything is written
            facts = executor.check([(n, batches[b]) for n, b in todo])
            if not resuming:
                try:
                    out.mkdir(parents=True, exist_ok=True)
                    _write_json_atomic(out / "layout.json", facts)
                    _write_json_atomic(out / "sweep.json", {"format": SWEEP_FORMAT, **asdict(cfg)})
                except OSError as err:
                    raise LensError(f"--out {out}: cannot write ({err.strerror}); choose a writable folder") from None
            parts.mkdir(exist_ok=True)
            with tqdm(total=len(units), initial=len(units) - len(todo), desc="sweep units", unit="unit",
                      disable=not progress) as bar:
                finished = len(units) - len(todo)
                timings = _read_timings(out)
                for (n, b), frame, timing in executor.run([(n, b, batches[b]) for n, b in todo]):
                    _write_parquet_atomic(parts / f"n{n}-b{b}.parquet", frame)
                    timings[f"n{n}-b{b}"] = timing
                    _write_json_atomic(out / "timing.json", timings)
                    ran.append(timing)
                    finished += 1
                    bar.update(1)
                    if on_unit:
                        on_unit(finished, len(units))
            if need_baseline:
                baseline = executor.baseline(query_ids, sorted(cfg.n))
                _write_parquet_atomic(parts / "baseline.parquet", baseline)
        finally:
            executor.close()
    # each part as read back from disk, so a resumed sweep and an uninterrupted one concatenate the same frames
    fresh = set(todo)
    frames = [read_records(parts / f"n{n}-b{b}.parquet") if (n, b) in fresh else done[n, b] for n, b in units]
    if cfg.baseline:
        frames.append(read_records(parts / "baseline.parquet") if need_baseline else baseline)
    records = pd.concat(frames, ignore_index=True)
    from lens.backend import describe

    backend = describe(dtype)
    _write_records(out / "records.parquet", records, cfg, backend)
    summary = summarize(records, cfg, backend=backend)
    layout_facts = out / "layout.json"
    if layout_facts.is_file():
        summary["layout"] = json.loads(layout_facts.read_text())
    _write_json_atomic(out / "summary.json", summary)
    if ran:
        from lens.backend import stamp
        from lens.runtime.timing import throughput, throughput_text

        total = throughput(ran)
        engine = " backend=nnsight (dense, transformers eager)" if cfg.backend == "nnsight" else ""
        log.info(f"this run: {throughput_text(total)} ({stamp(dtype)}{engine}; every unit in {out}/timing.json)")
        summary = {**summary, "timing": total}  # the run's speed, not part of the records' summary.json
    return summary


def _read_timings(out: Path) -> dict:
    """Each committed unit's timing (seconds, queries, where the time went), kept across resumes."""
    try:
        timings = json.loads((out / "timing.json").read_text())
    except (OSError, ValueError):
        return {}
    return timings if isinstance(timings, dict) else {}


def _mean(series) -> float | None:
    value = pd.to_numeric(series, errors="coerce").astype(float).mean()
    return None if value is None or math.isnan(value) else float(value)


def _interval(series) -> list[float] | None:
    ci = rate_interval(pd.to_numeric(series, errors="coerce").astype(float))
    return None if ci is None else [round(ci[0], 6), round(ci[1], 6)]


def _present(values: dict) -> dict:
    """Leave out metrics that no row had (e.g. Recall@5 with a beam of 2, or k > N)."""
    return {k: v for k, v in values.items() if v is not None}


def summarize(records: pd.DataFrame, cfg: SweepConfig, backend: dict | None = None) -> dict:
    """Aggregate tidy records into summary.json's shape (see the README)."""
    runs = []
    queries = records[records.level == "query"]
    layers = records[records.level == "layer"]
    heads = records[records.level == "head"]
    ks = [k for k in RECALL_K if rate_col("recall", k) in queries.columns]
    R, H = (lambda k: rate_col("recall", k)), (lambda k: rate_col("hit", k))
    for spec in cfg.interventions:
        name = parse_intervention(spec).spec()
        for n in sorted(cfg.n):
            q = queries[(queries.n_docs == n) & (queries.intervention == name)]
            lyr = layers[(layers.n_docs == n) & (layers.intervention == name)]
            hd = heads[(heads.n_docs == n) & (heads.intervention == name)]
            entry = dict(
                n_docs=n, intervention=name, queries=len(q), tokens=int(round(q.tokens.mean())),
                failed=int(q["failed"].fillna(False).astype(bool).sum()) if "failed" in q.columns else 0,
                recall_at_1=_mean(q[R(1)]),
                recall_at_k=_present({str(k): _mean(q[R(k)]) for k in ks}),
                hit_at_k=_present({str(k): _mean(q[H(k)]) for k in ks}),
                recall_at_k_ci=_present({str(k): _interval(q[R(k)]) for k in ks}),
                hit_at_k_ci=_present({str(k): _interval(q[H(k)]) for k in ks}),
                layers=[],
            )
            routers = {f"{r}_{red}": routing_cols(lyr.columns, r, red) for r in ROUTERS for red in REDUCES}
            for layer, group in lyr.groupby("layer"):
                h = hd[hd.layer == layer]
                item = dict(
                    layer=int(layer), r_sum=_mean(group.r_sum_hit), r_any=_mean(group.r_any_hit),
                    gold_mass=_mean(h.gold_mass), gold_maxsim=_mean(h.gold_maxsim), delta=_mean(h.delta),
                    gold_share=_mean(group.gold_share), first_digit_acc=_mean(group.first_digit_hit),
                    pred_gold_mass=_mean(h.pred_mass_maxsim),
                    r_sum_ci=_interval(group.r_sum_hit), r_any_ci=_interval(group.r_any_hit),
                    first_digit_acc_ci=_interval(group.first_digit_hit),
                )
                mass_cols = {str(k): rate_col("mass_recall", k) for k in MASS_RECALL_K}
                mass_cols = {k: c for k, c in mass_cols.items() if c in group and group[c].notna().any()}
                if mass_cols:  # records from before this column lack it
                    item["mass_recall"] = {k: _mean(group[c]) for k, c in mass_cols.items()}
                    item["mass_recall_ci"] = {k: _interval(group[c]) for k, c in mass_cols.items()}
                # routing recall@B: "routing_recall" is QK-MaxSim with heads reduced by max (the
                # paper's router); "routing_recall_by" every router and reduction
                by = {name: {str(b): _mean(group[c]) for b, c in cols if group[c].notna().any()}
                      for name, cols in routers.items()}
                by_ci = {name: {str(b): _interval(group[c]) for b, c in cols if group[c].notna().any()}
                         for name, cols in routers.items()}
                if by.get("maxsim_max"):
                    item["routing_recall"], item["routing_recall_ci"] = by["maxsim_max"], by_ci["maxsim_max"]
                    item["routing_recall_by"] = {k: v for k, v in by.items() if v}
                    item["routing_recall_by_ci"] = {k: v for k, v in by_ci.items() if v}
                entry["layers"].append(item)
            runs.append(entry)
    summary = dict(model=cfg.model, dataset=cfg.dataset, dtype=cfg.dtype, backend=backend or {},
                   beam=cfg.beam, ranking=cfg.ranking or "beam", confidence=CONFIDENCE, runs=runs)
    if cfg.baseline:
        base = records[records.level == "baseline"]
        bks = [k for k in RECALL_K if R(k) in base.columns and base[R(k)].notna().any()]
        summary["baseline"] = dict(
            model="all-MiniLM-L6-v2",
            recall_at_1={str(n): _mean(g[R(1)]) for n, g in base.groupby("n_docs")},
            recall_at_k={str(n): _present({str(k): _mean(g[R(k)]) for k in bks}) for n, g in base.groupby("n_docs")},
            hit_at_k={str(n): _present({str(k): _mean(g[H(k)]) for k in bks}) for n, g in base.groupby("n_docs")},
            recall_at_k_ci={str(n): _present({str(k): _interval(g[R(k)]) for k in bks})
                            for n, g in base.groupby("n_docs")},
            hit_at_k_ci={str(n): _present({str(k): _interval(g[H(k)]) for k in bks}) for n, g in base.groupby("n_docs")},
            queries={str(n): int(len(g)) for n, g in base.groupby("n_docs")},
        )
        for key in ("ndcg_at_10", "mrr_at_10"):  # graded-ranking measures, BEIR's
            col = key
            if col in base.columns:
                summary["baseline"][key] = {str(n): _mean(g[col]) for n, g in base.groupby("n_docs")}
                summary["baseline"][key + "_ci"] = {str(n): _interval(g[col]) for n, g in base.groupby("n_docs")}
    return summary
