"""hit@1 vs N per intervention, with the dense baseline (the length-generalisation plot).

Reads a records folder written by `lens sweep`, writes into RECORDS/report:

    .venv/bin/python experiments/fig1_recall_vs_n.py RECORDS [--layer L] [--n N]

(`lens report RECORDS` renders this and every other figure and table at once.)
"""

from lens.report import run_script

if __name__ == "__main__":
    run_script(__doc__, "fig1_recall_vs_n")
