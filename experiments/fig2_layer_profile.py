"""per-layer R_sum, R_any and logit-lens first-digit accuracy at one N (paper fig. 2).

Reads a records folder written by `lens sweep` and writes into RECORDS/report:

    .venv/bin/python experiments/fig2_layer_profile.py RECORDS [--layer L] [--n N]

(`lens report RECORDS` renders this and every other figure and table at once.)
"""

import argparse
from pathlib import Path

from lens.report import (  # noqa: F401
    fig_layer_profile, fig_recall_vs_n, fig_routing_recall, fig_rsum_rany_across_n, fig_theory, load_records,
    retrieval_layer, save_figure, table_gold_share, table_interventions, table_norms,
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records")
    parser.add_argument("--layer", type=int, default=None, help="default: the layer of peak gold mass")
    parser.add_argument("--n", type=int, default=None, help="N for per-layer profiles (default: smallest)")
    parser.add_argument("--s", type=float, default=0.43, help="SSMax s for the theory curve")
    args = parser.parse_args()
    records, summary = load_records(args.records)
    layer = retrieval_layer(summary) if args.layer is None else args.layer
    out = Path(args.records) / "report"
    out.mkdir(exist_ok=True)
    save_figure(fig_layer_profile(summary, args.n), out / 'fig2_layer_profile')
    print(f"wrote {out} (layer {layer})")


if __name__ == "__main__":
    main()
