"""hit@1 and Recall@1 for none / sink / SSMax / routing / SSMax+routing across N.

Reads a records folder written by `lens sweep`, writes into RECORDS/report:

    .venv/bin/python experiments/table_interventions.py RECORDS [--layer L] [--n N]

(`lens report RECORDS` renders this and every other figure and table at once.)
"""

from lens.report import run_script

if __name__ == "__main__":
    run_script(__doc__, "table_interventions")
