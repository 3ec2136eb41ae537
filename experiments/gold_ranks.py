"""Where a query's relevant documents sit in the model's ranking: for queries with two relevant
documents, the rank of the better-ranked one and of the other, from a sweep's ``ranked_codes``.

Run the sweep with a beam as wide as the corpus (``--beam N``: the beam over the corpus's codes
then keeps every code, so ``ranked_codes`` is the model's full ranking by probability), then

    .venv/bin/python experiments/gold_ranks.py RECORDS [RECORDS ...]

Prints, per (folder, N, intervention): the query count; the share of queries whose other relevant
document is among the top 2, 5 and 10 and in the bottom half of the ranking, each with its 95%
(Wilson) interval; and the median rank of each (1 = first).
"""

from __future__ import annotations

import argparse

import numpy as np

from lens.errors import LensError
from lens.report import load_records
from lens.stats import format_rate, wilson


def ranks(ranked: list[str], gold: list[str]) -> list[int]:
    """1-based ranks of the gold codes in ``ranked``, best first (a code not ranked: len + 1)."""
    where = {c: i + 1 for i, c in enumerate(ranked)}
    return sorted(where.get(c, len(ranked) + 1) for c in gold)


def rows(folder: str) -> list[str]:
    records, summary = load_records(folder)
    queries = records[records.level == "query"]
    out = []
    for (n, spec), group in queries.groupby(["n_docs", "intervention"]):
        pairs = [ranks(list(r), list(g)) for r, g in zip(group.ranked_codes, group.gold_codes) if len(g) == 2]
        if not pairs:
            continue
        if min(len(r) for r in group.ranked_codes) < n:
            raise LensError(f"{folder}: N={n} ranks fewer codes than the corpus holds; sweep with --beam {n}")
        first, other = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        q = len(pairs)
        cells = [summary["model"], spec, str(n), str(q)]
        for k in (2, 5, 10):
            hits = int((other <= k).sum())
            cells.append(format_rate(hits / q, wilson(hits, q), q))
        bottom = int((other > n / 2).sum())
        cells.append(format_rate(bottom / q, wilson(bottom, q), q))
        cells += [f"{np.median(first):g}", f"{np.median(other):g}"]
        out.append("| " + " | ".join(cells) + " |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="+")
    args = parser.parse_args()
    head = ["model", "intervention", "N", "queries", "other relevant in top 2", "in top 5", "in top 10",
            "in the bottom half", "median rank, better relevant", "median rank, other relevant"]
    try:
        lines = [line for folder in args.records for line in rows(folder)]
    except LensError as err:
        raise SystemExit(f"gold_ranks: {err}") from None
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
