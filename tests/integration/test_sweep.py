"""Sweeps: records and summary shape, resuming after a kill (identical records), argument
clashes, bad specs and datasets as one-line errors."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

ARGS = ["--model", "tiny-llama", "--dataset", "synthetic-limit:docs=30,items=5,queries=6", "--n", "4,12,30",
        "--queries", "6", "--batch", "2", "--intervention", "none", "--intervention", "ssmax:s=0.43,n=docs",
        "--intervention", "route:layer=1,B=3", "--dtype", "float32"]


def lens(*args, wait=True):
    cmd = [sys.executable, "-m", "lens.cli", *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "full"
    done = lens("sweep", *ARGS, "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    (out.parent / "stderr.txt").write_text(done.stderr)
    return out


def test_the_sweep_times_its_units(uninterrupted):
    timing = json.loads((uninterrupted / "timing.json").read_text())
    assert set(timing) == {f"n{n}-b{b}" for n in (4, 12, 30) for b in range(3)}
    unit = timing["n12-b1"]
    assert unit["queries"] == 2 and unit["interventions"] == 3 and unit["seconds"] > 0
    parts = ("prefill", "corpus attention", "finish", "readout statistics")
    assert 0 <= sum(unit[k] for k in parts) <= unit["seconds"]
    log = (uninterrupted.parent / "stderr.txt").read_text()
    assert "this run: query work" in log and "for 54 queries x cells" in log and "kernel=" in log


def test_records_and_summary(uninterrupted):
    records = pd.read_parquet(uninterrupted / "records.parquet")
    assert set(records.level) == {"query", "layer", "head"}
    per_query = records[records.level == "query"]
    assert len(per_query) == 6 * 3 * 3  # queries x N x interventions
    heads = records[records.level == "head"]
    assert len(heads) == 6 * 3 * 3 * 3 * 6  # ... x layers x heads
    assert not heads.duplicated(["query_id", "n_docs", "intervention", "layer", "head"]).any()
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["model"] == "tiny-llama" and len(summary["runs"]) == 9
    run = summary["runs"][0]
    assert {"n_docs", "intervention", "queries", "tokens", "recall_at_1", "recall_at_k", "hit_at_k", "layers"} <= set(run)
    assert set(run["recall_at_k"]) == {"1", "2"}  # beam 2
    assert {"layer", "r_sum", "r_any", "gold_mass", "gold_maxsim", "delta", "gold_share", "first_digit_acc",
            "routing_recall"} <= set(run["layers"][0])
    # the summary is the mean of the records
    q = per_query[(per_query.n_docs == 12) & (per_query.intervention == "none")]
    entry = next(r for r in summary["runs"] if r["n_docs"] == 12 and r["intervention"] == "none")
    assert entry["recall_at_k"]["2"] == pytest.approx(q["recall_at_2"].mean())
    # Recall@k by attention mass per layer, with its interval (k up to N: 2 and 5 at N=12, not 10 at N=4)
    lyr = records[(records.level == "layer") & (records.n_docs == 12) & (records.intervention == "none")]
    item = entry["layers"][2]
    assert set(item["mass_recall"]) == {"2", "5", "10"} and set(item["mass_recall_ci"]) == {"2", "5", "10"}
    assert item["mass_recall"]["2"] == pytest.approx(lyr[lyr.layer == 2]["mass_recall_at_2"].mean())
    low, high = item["mass_recall_ci"]["2"]
    assert low <= item["mass_recall"]["2"] <= high
    assert "10" not in next(r for r in summary["runs"] if r["n_docs"] == 4)["layers"][0]["mass_recall"]
    # every router's routing recall, with intervals; plain column names, codes as lists
    by = run["layers"][1]["routing_recall_by"]
    assert set(by) == {"maxsim_max", "maxsim_mean", "meankey_max", "meankey_mean", "chunkmean_max", "chunkmean_mean"}
    assert by["maxsim_max"] == run["layers"][1]["routing_recall"] and set(run["layers"][1]["routing_recall_by_ci"]) == set(by)
    assert not any("@" in c for c in records.columns)
    assert all(len(codes) == 2 for codes in per_query.ranked_codes)
    # tokens grow with N; routing leaves mass only on routed documents past its layer
    tokens = [r["tokens"] for r in summary["runs"] if r["intervention"] == "none"]
    assert tokens == sorted(tokens) and tokens[0] < tokens[-1]


def test_killed_sweep_resumes_to_identical_records(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    proc = lens("sweep", *ARGS, "--out", str(out), wait=False)
    parts = out / "parts"
    deadline = time.time() + 600
    while time.time() < deadline and len(list(parts.glob("n*.parquet"))) < 3 and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(list(parts.glob("n*.parquet")))
    assert 3 <= committed < 9 and not (out / "records.parquet").exists()
    resumed = lens("sweep", *ARGS, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = pd.read_parquet(out / "records.parquet")
    b = pd.read_parquet(uninterrupted / "records.parquet")
    pd.testing.assert_frame_equal(a, b)
    assert json.loads((out / "summary.json").read_text()) == json.loads((uninterrupted / "summary.json").read_text())


def test_resuming_at_a_later_unit_gives_identical_records(uninterrupted, tmp_path):
    # Deterministic twin of the kill test: resume where only N=4 and part of N=12 are done, so the
    # resumed process prefills documents in another order than the uninterrupted one did.
    out = tmp_path / "resumed"
    shutil.copytree(uninterrupted, out)
    (out / "records.parquet").unlink()
    for part in ["n12-b2", "n30-b0", "n30-b1", "n30-b2"]:
        (out / "parts" / f"{part}.parquet").unlink()
    resumed = lens("sweep", *ARGS, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    pd.testing.assert_frame_equal(pd.read_parquet(out / "records.parquet"),
                                  pd.read_parquet(uninterrupted / "records.parquet"))


def test_other_arguments_into_the_same_dir_are_refused(uninterrupted):
    args = list(ARGS)
    args[args.index("4,12,30")] = "4,12"
    out = lens("sweep", *args, "--out", str(uninterrupted))
    assert out.returncode == 2
    assert "holds a sweep with other arguments (n: [4, 12, 30] there, [4, 12] now)" in out.stderr


def test_a_sweep_an_older_lens_wrote_is_refused_by_name(uninterrupted, tmp_path):
    """Parts of the first records format cannot be resumed into today's: the error says so (and
    that the folder's records stay readable), and nothing in the folder changes."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(uninterrupted, old)
    meta = json.loads((old / "sweep.json").read_text())
    (old / "sweep.json").write_text(json.dumps({**meta, "format": 1}))
    before = sorted((p.name, p.stat().st_mtime_ns) for p in old.rglob("*"))
    out = lens("sweep", *ARGS, "--out", str(old))
    assert out.returncode == 2 and "an older lens wrote (records format 1; this lens writes 2)" in out.stderr
    assert "Traceback" not in out.stderr and sorted((p.name, p.stat().st_mtime_ns) for p in old.rglob("*")) == before


@pytest.mark.parametrize("change,message", [
    (("--intervention", "ssmax:s=x"), "s='x' is not a number"),
    (("--dataset", "no/such/folder"), "dataset 'no/such/folder': not a folder"),
    (("--n", "4,500"), "N=500 is larger than the pool of 30 documents"),
    (("--baseline", "bm25"), "baseline 'bm25'"),
])
def test_bad_input_is_one_line(change, message, tmp_path):
    args = list(ARGS)
    if change[0] in ("--dataset", "--n"):
        args[args.index(change[0]) + 1] = change[1]
    else:
        args += list(change)
    out = lens("sweep", *args, "--out", str(tmp_path / "x"))
    errors = [l for l in out.stderr.splitlines() if l.startswith("lens: error:")]
    assert out.returncode == 2 and len(errors) == 1 and message in errors[0], out.stderr[-1500:]
    assert "Traceback" not in out.stderr


def test_report_renders_from_records(uninterrupted):
    from lens.report import render_report, retrieval_layer

    written = render_report(uninterrupted, layer=1)
    names = {p.name for p in written}
    for stem in ("fig1_recall_vs_n", "fig2_layer_profile", "fig3_rsum_rany_across_n", "fig5_routing_recall",
                 "theory_gold_mass"):
        assert f"{stem}.html" in names
    summary = json.loads((uninterrupted / "summary.json").read_text())
    table = pd.read_csv(uninterrupted / "report" / "table1_gold_share.csv")
    expected = [next(l for l in r["layers"] if l["layer"] == 1)["gold_share"]
                for r in sorted((r for r in summary["runs"] if r["intervention"] == "none"), key=lambda r: r["n_docs"])]
    assert table.gold_share.tolist() == pytest.approx(expected)
    interventions = pd.read_csv(uninterrupted / "report" / "table_interventions.csv")
    assert list(interventions.intervention) == ["none", "ssmax:s=0.43,n=docs", "route:layer=1,B=3"]
    assert 0 <= retrieval_layer(summary) < 3


def test_a_config_file_is_the_same_sweep_as_its_flags(uninterrupted, tmp_path):
    config = tmp_path / "sweep.toml"
    config.write_text('model = "tiny-llama"\ndataset = "synthetic-limit:docs=30,items=5,queries=6"\nn = [4, 12, 30]\n'
                      'queries = 6\nbatch = 2\nintervention = ["none", "ssmax:s=0.43,n=docs", "route:layer=1,B=3"]\n'
                      'dtype = "float32"\nqueries-unused = 1\n')
    refused = lens("sweep", "--config", str(config), "--out", str(tmp_path / "bad"))
    assert refused.returncode == 2 and "unknown option 'queries-unused'" in refused.stderr
    config.write_text(config.read_text().replace("queries-unused = 1\n", ""))
    done = lens("sweep", "--config", str(config), "--out", str(tmp_path / "toml"))
    assert done.returncode == 0, done.stderr[-2000:]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "toml" / "records.parquet"),
                                  pd.read_parquet(uninterrupted / "records.parquet"), check_exact=True)
    flags_win = lens("sweep", "--config", str(config), "--n", "4", "--out", str(tmp_path / "flag"))
    assert flags_win.returncode == 0 and set(pd.read_parquet(tmp_path / "flag" / "records.parquet").n_docs) == {4}


def test_records_carry_what_ran_and_their_schema(uninterrupted):
    import pyarrow.parquet as pq

    records = pd.read_parquet(uninterrupted / "records.parquet")
    for column, value in dict(model="tiny-llama", dataset="synthetic-limit:docs=30,items=5,queries=6",
                              dtype="float32").items():
        assert set(records[column]) == {value}
    assert records.backend.nunique() == 1 and records.lens_version.nunique() == 1
    meta = pq.read_schema(uninterrupted / "records.parquet").metadata
    assert meta[b"lens_records_format"] == b"2"
    assert json.loads(meta[b"lens_sweep"])["interventions"][1] == "ssmax:s=0.43,n=docs"
