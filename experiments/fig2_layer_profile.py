"""per-layer R_sum, R_any and logit-lens first-digit accuracy at one N (paper fig. 2).

Reads a records folder written by `lens sweep`, writes into RECORDS/report:

    .venv/bin/python experiments/fig2_layer_profile.py RECORDS [--layer L] [--n N]

(`lens report RECORDS` renders this and every other figure and table at once.)
"""

from lens.report import run_script

if __name__ == "__main__":
    run_script(__doc__, "fig2_layer_profile")
