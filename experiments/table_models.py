"""Models side by side, one row per (records folder, N, intervention), as a markdown table: how
the codes were ranked (the beam's order or by exclusion, docs/records.md), hit@1, Recall@2 and the dense baseline's Recall@2 with 95% intervals and query counts, and per layer the
best R_any / R_sum and the logit lens (its best layer against the last layer).

    .venv/bin/python experiments/table_models.py RECORDS [RECORDS ...] [--layers] [--mass-layer L | --mass-best]

``--layers`` adds, per row, the layers where R_any is at least 0.8 (the retrieval band).
``--mass-layer L`` adds Recall@2 of the documents ranked by the readout token's attention mass
(summed over heads) at layer L; ``--mass-best`` adds the best layer's instead (pick the layer on
other queries than the ones you report: the best of 30 layers on the same queries is biased up).
"""

from __future__ import annotations

import argparse

from lens.errors import LensError
from lens.report import load_records
from lens.stats import format_rate


def _best(layers: list[dict], key: str) -> tuple[int, float, list | None]:
    scored = [l for l in layers if l.get(key) is not None]
    top = max(scored, key=lambda l: l[key])
    return top["layer"], top[key], top.get(f"{key}_ci")


def rows(folder: str, band: bool, mass_layer: int | None = None, mass_best: bool = False) -> list[str]:
    _, summary = load_records(folder)
    base = summary.get("baseline", {})
    out = []
    for run in sorted(summary["runs"], key=lambda r: (r["intervention"], r["n_docs"])):
        n, q = str(run["n_docs"]), run["queries"]
        cells = [summary["model"], run["intervention"], summary.get("ranking", "beam"), n, str(run["tokens"]), str(q),
                 format_rate(run["hit_at_k"].get("1"), run.get("hit_at_k_ci", {}).get("1"), q),
                 format_rate(run["recall_at_k"].get("2"), run.get("recall_at_k_ci", {}).get("2"), q)]
        if n in base.get("recall_at_k", {}):
            bq = base.get("queries", {}).get(n, q)
            cells.append(format_rate(base["recall_at_k"][n].get("2"), base.get("recall_at_k_ci", {}).get(n, {}).get("2"), bq))
        else:
            cells.append("")
        layers = run["layers"]
        for key in ("r_any", "r_sum"):
            layer, value, ci = _best(layers, key)
            cells.append(f"{format_rate(value, ci, q)} @L{layer}")
        layer, value, ci = _best(layers, "first_digit_acc")
        last = layers[-1]
        cells.append(f"{format_rate(value, ci, q)} @L{layer}; last L{last['layer']} "
                     f"{format_rate(last['first_digit_acc'], last.get('first_digit_acc_ci'), q)}")
        if mass_layer is not None or mass_best:
            cells.append(_mass_cell(layers, q, mass_layer))
        if band:
            cells.append(",".join(str(l["layer"]) for l in layers if (l.get("r_any") or 0) >= 0.8) or "none")
        out.append("| " + " | ".join(cells) + " |")
    return out


def _mass_cell(layers: list[dict], q: int, layer: int | None) -> str:
    """Recall@2 by attention mass at ``layer`` (None: the best layer), or empty where the records
    lack it (sweeps from before the column)."""
    scored = [dict(layer=l["layer"], v=l["mass_recall"]["2"], ci=l.get("mass_recall_ci", {}).get("2"))
              for l in layers if l.get("mass_recall", {}).get("2") is not None]
    if layer is not None:
        scored = [l for l in scored if l["layer"] == layer]
    if not scored:
        return ""
    top = max(scored, key=lambda l: l["v"])
    return f"{format_rate(top['v'], top['ci'], q)} @L{top['layer']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="+")
    parser.add_argument("--layers", action="store_true", help="add the layers with R_any >= 0.8")
    parser.add_argument("--mass-layer", type=int, default=None, help="add Recall@2 by attention mass at this layer")
    parser.add_argument("--mass-best", action="store_true", help="add the best layer's Recall@2 by attention mass")
    args = parser.parse_args()
    if args.mass_layer is not None and args.mass_best:
        parser.error("give --mass-layer L or --mass-best, not both")
    mass = ["Recall@2 by mass (best layer)" if args.mass_best else f"Recall@2 by mass at L{args.mass_layer}"] \
        if args.mass_best or args.mass_layer is not None else []
    head = ["model", "intervention", "ranking", "N", "tokens", "queries", "hit@1", "Recall@2", "MiniLM Recall@2",
            "max R_any", "max R_sum", "logit-lens first digit (best; last layer)"] + mass + (["R_any >= 0.8 at"] if args.layers else [])
    try:  # every folder read before the table starts, so a bad one prints no half table
        lines = [line for folder in args.records for line in rows(folder, args.layers, args.mass_layer, args.mass_best)]
    except LensError as err:
        raise SystemExit(f"table_models: {err}") from None
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
