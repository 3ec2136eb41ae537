"""Streamlit AppTest: each page's widgets driven, the numbers shown equal what the lens API
returns for the same inputs."""

import json
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from kernels.interventions import SSMax, Temperature
from lens.runtime import BlockSearchRunner
from lens.data.datasets import load_dataset
from lens.workbench import compare_runs

APP = str(Path(__file__).resolve().parents[2] / "app" / "main.py")
MODEL, DATASET = "tiny-llama", "synthetic-limit:docs=40,items=5,queries=6"


def _app(tmp_path, **state):
    at = AppTest.from_file(APP, default_timeout=600)
    at.session_state["model"] = MODEL
    at.session_state["dataset"] = DATASET
    at.session_state["dash-n"] = "4,16"
    at.session_state["dash-folder"] = str(tmp_path / "records")
    for key, value in state.items():
        at.session_state[key] = value
    return at


def _metrics(at):
    return {m.label: m.value for m in at.metric}


def test_dashboard_runs_the_default_sweep_and_shows_its_numbers(tmp_path):
    at = _app(tmp_path).run()
    assert not at.exception and not at.error
    assert not (tmp_path / "records").exists()  # a typed folder is written only after a click
    at.button(key="dash-run").click().run()
    assert not at.exception and not at.error
    summary = json.loads((tmp_path / "records" / "summary.json").read_text())
    run = next(r for r in summary["runs"] if r["n_docs"] == 16 and r["intervention"] == "none")
    assert _metrics(at)["hit@1 at N=16 (none)"] == f"{run['hit_at_k']['1']:.2f}"
    from lens.report import retrieval_layer
    assert _metrics(at)["retrieval layer (R_any, then GoldShare)"] == str(retrieval_layer(summary))
    at.radio(key="dash-metric").set_value("gold_rank").run()
    assert not at.exception
    buttons = {b.key for b in at.get("download_button")}
    assert {"dash-records-download", "dash-summary-download", "fig-rsum-download", "fig-heads-download"} <= buttons


def test_the_dashboards_sweep_runs_in_the_apps_dtype(tmp_path, monkeypatch):
    """LENS_DTYPE sets the dtype of the dashboard's sweeps as it does the app's models."""
    import torch

    from lens.backend import auto_dtype

    want = "float32" if auto_dtype() == torch.bfloat16 else "bfloat16"  # not what auto picks here
    monkeypatch.setenv("LENS_DTYPE", want)
    at = _app(tmp_path, **{"dash-n": "4"}).run()
    at.button(key="dash-run").click().run()
    assert not at.exception and not at.error
    assert json.loads((tmp_path / "records" / "summary.json").read_text())["dtype"] == want


def test_the_apps_records_folder_is_one_per_dtype():
    """A sweep in another dtype gets its own folder (``auto`` as the dtype it resolves to), so the
    first visit never resumes records made in another dtype."""
    from lens.backend import auto_dtype
    from lens.workbench import records_folder

    args = ("blocksearch-135m", "limit-pairs:docs=46", [4, 16], 8)
    f32, bf16 = records_folder(*args, "float32"), records_folder(*args, "bfloat16")
    assert f32 != bf16 and "float32" in f32.name and "bfloat16" in bf16.name
    assert records_folder(*args) == (bf16 if auto_dtype() == torch.bfloat16 else f32)


def test_dashboard_bad_input_is_a_message_not_a_traceback(tmp_path):
    at = _app(tmp_path, **{"dash-n": "4,400"}).run()
    assert not at.exception
    assert any("N=400 is larger than the pool of 40 documents" in e.value for e in at.error)
    at = _app(tmp_path, dataset=str(tmp_path)).run()
    assert not at.exception
    assert any("not a BEIR-format folder" in e.value for e in at.error)


@pytest.mark.parametrize("damage", ["garbage-json", "empty-runs", "garbage-parquet", "a-file"])
def test_dashboard_shows_a_bad_records_folder_as_an_error(tmp_path, damage):
    folder = tmp_path / "records"
    folder.mkdir()
    (folder / "records.parquet").write_bytes(b"PAR1 not really")
    (folder / "summary.json").write_text({"garbage-json": "{nope", "empty-runs": '{"runs": []}'}.get(damage, '{"runs": [{"n_docs": 4}]}'))
    if damage == "a-file":
        folder = tmp_path / "a-file"
        folder.write_text("x")
    at = _app(tmp_path, **{"dash-folder": str(folder)}).run()
    assert not at.exception
    assert at.error or at.info
    at.button(key="dash-run").click().run() if damage != "a-file" else None
    assert not at.exception


def test_an_unknown_model_name_in_the_state_is_a_warning(tmp_path):
    at = _app(tmp_path)
    at.session_state["model"] = "no-such-model"
    at.run()
    assert not at.exception and any("no-such-model" in w.value for w in at.warning)


def _runner():
    from lens.models.registry import load_model
    import torch

    from app.common import app_dtype
    from lens.backend import resolve_dtype

    return BlockSearchRunner(load_model(MODEL, dtype=resolve_dtype(app_dtype())), load_dataset(DATASET), progress=False)


def test_inspector_shows_the_lens_run(tmp_path):
    at = _app(tmp_path).switch_page("pages/inspector.py")
    at.session_state["insp-n"] = 16
    at.session_state["insp-query"] = "q3"
    at.run()
    assert not at.exception and not at.error
    run = _runner().run_query("q3", 16, beam=2)
    shown = _metrics(at)
    assert shown["decoded"] == run.decoded
    assert shown["gold"] == ", ".join(run.gold_codes)
    assert shown["context tokens"] == str(run.n_tokens)
    at.checkbox(key="insp-exclude").check().run()
    assert not at.exception and not at.error
    from lens.workbench import ranked_by_exclusion

    codes = ranked_by_exclusion(_runner(), "q3", 16)
    assert codes[0] == run.ranked_codes[0] and len(set(codes)) == 2
    assert any(f"**by exclusion**: {codes[0]}" in m.value for m in at.markdown)


def test_lab_controls_change_the_numbers_as_the_api_does(tmp_path):
    at = _app(tmp_path).switch_page("pages/lab.py")
    at.session_state["lab-n"] = 16
    at.run()
    assert not at.exception and not at.error
    before = _metrics(at)
    at.checkbox(key="lab-temperature").check()
    at.checkbox(key="lab-ssmax").check().run()  # a switched-on intervention's controls take input
    at.slider(key="lab-temperature-t").set_value(0.5)
    at.slider(key="lab-ssmax-s").set_value(0.43).run()
    after = _metrics(at)
    peak_key = next(k for k in after if k.startswith("gold mass at layer") and k.endswith("after"))
    assert after[peak_key] != before[peak_key]
    runner = _runner()
    def streams(fn, n=16, drafts=None):
        return runner.run_streams([runner.stream(q, n, fn) for q in ("q0", "q1")], beam=2, drafts=drafts)

    plain = streams(None)  # the lab verifies the plain run's codes as drafts in the rerun's query pass:
    # the same codes as undrafted, with margins that differ at the model dtype's rounding, so the same call here
    expected = compare_runs(plain, streams(Temperature(0.5) + SSMax(0.43), drafts=[r.ranked_codes for r in plain]))
    layer = int(peak_key.split("layer ")[1].split()[0])
    assert after[peak_key] == f"{expected['layers'].gold_mass_after[layer]:.4f}"
    assert after["hit@1 after"] == f"{expected['after']['hit_at_1']:.2f}"
    decoded = at.dataframe[0].value  # codes and the top-two margins, as the API gives them
    assert list(decoded.decoded_after) == [d for _, d, _ in expected["after"]["decoded"]]
    assert list(decoded.margin_after) == pytest.approx(expected["after"]["margin"])
    assert all(m >= 0 for m in decoded.margin_after)
    at.text_input(key="lab-sweep-n").set_value("4,16")
    at.text_input(key="lab-sweep-grid").set_value("0.3,0.6")
    at.button(key="lab-sweep-run").click().run()
    assert not at.exception and not at.error
    table = at.dataframe[-1].value
    assert len(table) == 4 and set(table.N) == {4, 16}
    expected = compare_runs(*[streams(SSMax(0.6))] * 2)  # the grid's last value at N=16
    assert table.hit_at_1.iloc[-1] == pytest.approx(expected["after"]["hit_at_1"])


def test_the_inspector_reruns_a_query_only_when_its_inputs_change(tmp_path, monkeypatch):
    calls = []
    real = BlockSearchRunner.run_query
    monkeypatch.setattr(BlockSearchRunner, "run_query", lambda self, *a, **k: calls.append(a) or real(self, *a, **k))
    at = _app(tmp_path).switch_page("pages/inspector.py")
    at.session_state["insp-n"] = 12
    at.session_state["insp-query"] = "q4"
    at.run()
    assert not at.exception and not at.error and len(calls) == 1
    at.slider(key="insp-layer").set_value(0).run()  # a view of the same run: no rerun of the query
    assert not at.exception and len(calls) == 1
    at.number_input(key="insp-n").set_value(8).run()
    assert len(calls) == 2


@pytest.mark.parametrize("page, keys", [
    ("pages/inspector.py", ["insp-band-download", "insp-top-download", "insp-table-download"]),
    ("pages/lab.py", ["lab-mass-download", "lab-r-download", "lab-layers-download"]),
])
def test_every_page_offers_its_figures_and_tables(tmp_path, page, keys):
    at = _app(tmp_path, **{"lab-n": 8, "insp-n": 8}).switch_page(page).run()
    assert not at.exception and not at.error
    buttons = {b.key for b in at.get("download_button")}
    assert set(keys) <= buttons, buttons


def test_every_intervention_switched_on_in_the_lab_gives_a_label_that_parses(tmp_path):
    from kernels.score_functions import INTERVENTIONS
    from kernels.spec import parse_intervention

    at = _app(tmp_path, **{"lab-n": 8}).switch_page("pages/lab.py").run()
    for name in INTERVENTIONS:
        at.checkbox(key=f"lab-{name}").check()
    at.run()
    assert not at.exception and not at.error
    label = next(m.value for m in at.markdown if m.value.startswith("**intervention:**")).split("`")[1]
    assert "scale-heads" not in label  # no heads chosen yet: not applied
    at.multiselect(key="lab-scale-heads-heads").select(1).run()
    label = next(m.value for m in at.markdown if m.value.startswith("**intervention:**")).split("`")[1]
    assert parse_intervention(label).spec() == label and label.count("+") == len(INTERVENTIONS) - 1
