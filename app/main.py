"""lens workbench: `streamlit run app/main.py`.  Thin pages over the lens API (lens.workbench,
lens.report, lens.metrics); every number shown is computed by lens."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `streamlit run app/main.py` from a checkout without an install
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

st.set_page_config(page_title="lens", layout="wide")
pages = [
    st.Page(str(Path(__file__).parent / "pages" / "dashboard.py"), title="Dilution dashboard", default=True),
    st.Page(str(Path(__file__).parent / "pages" / "inspector.py"), title="Query inspector"),
    st.Page(str(Path(__file__).parent / "pages" / "lab.py"), title="Intervention lab"),
]
st.navigation(pages).run()
