"""A sweep's rankings as TREC files, the format trec_eval, pytrec_eval and ir-measures read.

``qrels.txt``: ``query_id 0 code 1`` for each query's gold documents (codes identify documents
within a corpus).  ``{intervention}.n{N}.run`` per (intervention, N), and ``all-MiniLM-L6-v2.n{N}.run`` for
the dense baseline: ``query_id Q0 code rank score lens``, the model's ranked codes (a beam's
width of them) with score = minus the rank.
"""

from __future__ import annotations

import re
from pathlib import Path

from lens.errors import LensError
from lens.metrics import read_records


def _name(intervention: str, n: int) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", intervention) + f".n{n}.run"


def _codes(value) -> list[str]:
    """A list column's value (a failed run's may be missing)."""
    return [] if value is None or isinstance(value, float) else [str(c) for c in value if c]


def write_trec(folder: str | Path, out: str | Path) -> list[Path]:
    folder, out = Path(folder).expanduser(), Path(out).expanduser()
    records = folder / "records.parquet"
    if not records.is_file():
        raise LensError(f"{folder}: no records.parquet; give a folder written by `lens sweep`")
    import pyarrow.parquet as pq

    if "ranked_codes" not in pq.read_schema(records).names:
        raise LensError(f"{records}: no ranked codes (written by an older lens); rerun the sweep")
    # the ranking rows only: the per-layer and per-head rows, most of the file, are not read
    rows = read_records(records, columns=["level", "query_id", "n_docs", "intervention", "gold_codes", "ranked_codes"],
                        filters=[("level", "in", ["query", "baseline"])])
    out.mkdir(parents=True, exist_ok=True)
    qrels = {(r.query_id, code) for r in rows.itertuples() for code in _codes(r.gold_codes)}
    paths = [out / "qrels.txt"]
    paths[0].write_text("".join(f"{q} 0 {c} 1\n" for q, c in sorted(qrels)))
    for (intervention, n), group in rows.groupby(["intervention", "n_docs"], sort=True):
        lines = []
        for r in group.itertuples():
            ranked = _codes(r.ranked_codes)
            lines += [f"{r.query_id} Q0 {code} {rank} {-rank} lens\n" for rank, code in enumerate(ranked, 1)]
        path = out / _name(intervention, int(n))
        path.write_text("".join(lines))
        paths.append(path)
    return paths
