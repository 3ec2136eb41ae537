"""routing recall@B vs B at one layer, largest N (paper fig. 5).

Reads a records folder written by `lens sweep`, writes into RECORDS/report:

    .venv/bin/python experiments/fig5_routing_recall.py RECORDS [--layer L] [--n N]

(`lens report RECORDS` renders this and every other figure and table at once.)
"""

from lens.report import run_script

if __name__ == "__main__":
    run_script(__doc__, "fig5_routing_recall")
