"""per-layer R_sum and R_any across N, two panels (paper fig. 3).

Reads a records folder written by `lens sweep`, writes into RECORDS/report:

    .venv/bin/python experiments/fig3_rsum_rany.py RECORDS [--layer L] [--n N]

(`lens report RECORDS` renders this and every other figure and table at once.)
"""

from lens.report import run_script

if __name__ == "__main__":
    run_script(__doc__, "fig3_rsum_rany")
