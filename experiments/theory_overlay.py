"""measured vs predicted gold attention mass across N at one layer (1/(1+(N-1)e^-Δ), SSMax form).

Reads a records folder written by `lens sweep`, writes into RECORDS/report:

    .venv/bin/python experiments/theory_overlay.py RECORDS [--layer L] [--n N]

(`lens report RECORDS` renders this and every other figure and table at once.)
"""

from lens.report import run_script

if __name__ == "__main__":
    run_script(__doc__, "theory_overlay")
