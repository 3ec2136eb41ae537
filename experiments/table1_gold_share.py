"""GoldShare ||W_O a^G|| / ||W_O a|| per N at one layer, with both norms (paper table 1).

Reads a records folder written by `lens sweep`, writes into RECORDS/report:

    .venv/bin/python experiments/table1_gold_share.py RECORDS [--layer L] [--n N]

(`lens report RECORDS` renders this and every other figure and table at once.)
"""

from lens.report import run_script

if __name__ == "__main__":
    run_script(__doc__, "table1_gold_share")
