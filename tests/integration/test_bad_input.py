"""Bad input and faults: one line on stderr naming the problem and the fix, exit 2, no traceback,
nothing written to --out; and the silent cases give an error or the right result."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from kernels.spec import InterventionSpecError, parse_intervention
from lens.data.datasets import Dataset, Document, Query, load_beir
from lens.data.layout import LayoutConfig, build_pool_layout
from lens.runtime import BlockSearchRunner
from lens.errors import LensError

TINY = ["--model", "tiny-llama", "--dataset", "synthetic-limit:docs=12,items=4,queries=4", "--queries", "4",
        "--dtype", "float32"]


def lens(*args):
    return subprocess.run([sys.executable, "-m", "lens.cli", *args], capture_output=True, text=True, timeout=600)


def refused(result, *words):
    assert result.returncode == 2, result.stderr[-1500:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("spec, message", [
    ("ssmax:s=nan", "not a finite number"), ("ssmax:s=inf", "not a finite number"), ("sink:b=nan", "not a finite"),
    ("scale-heads:layer=1,heads=0,factor=-inf", "not a finite"), ("temperature:t=1e-300", "outside"),
    ("sink:b=1e308", "outside"), ("sink:b=-1e31", "outside"), ("ssmax:s=-1", "must be > 0"), ("temperature:t=0.5,layers=nan", "not a finite"),
    ("route:layer=inf,B=3", "not a finite"), ("route:layer=1,B=3+route:layer=1,B=4", "at most one route"),
])
def test_non_finite_and_extreme_parameters_are_refused(spec, message):
    with pytest.raises(InterventionSpecError, match=message):
        parse_intervention(spec)


@pytest.mark.parametrize("spec", ["sink:b=1e9", "ssmax:s=50", "temperature:t=1e-3", "sink:b=-1e4",
                                  "ssmax:s=16:0.5|17:0.6,n=docs", "scale-heads:layer=1,heads=0|2,factor=1e3"])
def test_labels_round_trip(spec):
    fn = parse_intervention(spec)
    assert parse_intervention(fn.spec()).spec() == fn.spec() and "+" not in fn.spec()


@pytest.mark.parametrize("spec, message", [
    ("scale-heads:layer=99,heads=0,factor=2", "layer 99 does not exist"),
    ("scale-heads:layer=1,heads=99,factor=2", "head 99 does not exist"),
    ("temperature:t=0.5,layers=99", "layer 99 does not exist"),
    ("ssmax:s=99:0.5", "layer 99 does not exist"),
    ("ssmax:s=0.1|0.2|0.3|0.4", "4 per-layer values for a 3-layer model"),
    ("head-sink:b=0|0|0|0|0|0|0", "7 per-head values for layers of 6 heads"),
])
def test_layers_and_heads_the_model_lacks_are_refused(models, small_limit, spec, message):
    runner = BlockSearchRunner(models("tiny-llama"), small_limit, progress=False)
    with pytest.raises(InterventionSpecError, match=message):
        runner.stream("q0", 8, parse_intervention(spec))


def test_a_refused_sweep_writes_nothing_and_the_corrected_one_runs(tmp_path):
    out = tmp_path / "out"
    refused(lens("sweep", *TINY, "--n", "4", "--intervention", "scale-heads:layer=7,heads=0,factor=2", "--out", str(out)),
            "layer 7 does not exist")
    assert not out.exists()
    refused(lens("sweep", *TINY, "--n", "4,4", "--out", str(out)), "N=4 more than once")
    refused(lens("sweep", *TINY, "--n", "4", "--batch", "0", "--out", str(out)), "--batch")
    refused(lens("sweep", *TINY, "--n", "4", "--dtype", "fp16", "--out", str(out)), "choose one of auto")
    assert not out.exists()
    done = lens("sweep", *TINY, "--n", "4", "--intervention", "sink:b=1e4", "--out", str(out))
    assert done.returncode == 0, done.stderr[-1500:]
    summary = json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    run = summary["runs"][0]
    assert run["queries"] == 4 and len(run["hit_at_k_ci"]["1"]) == 2 and summary["dtype"] == "float32"
    masses = pd.read_parquet(out / "records.parquet").query("level == 'head'").gold_mass
    assert masses.between(0, 1).all()


def test_an_edited_dataset_is_not_resumed(tmp_path):
    folder = tmp_path / "beir"
    folder.mkdir()
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": f"document {i} about topic {i}"}) + "\n"
                                                 for i in range(6)))
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q0", "text": "topic 3"}) + "\n")
    (folder / "qrels.jsonl").write_text(json.dumps({"query-id": "q0", "corpus-id": "d3", "score": 1}) + "\n")
    args = ["--model", "tiny-llama", "--dataset", str(folder), "--n", "4", "--queries", "1", "--dtype", "float32",
            "--out", str(tmp_path / "out")]
    assert lens("sweep", *args).returncode == 0
    (folder / "corpus.jsonl").write_text((folder / "corpus.jsonl").read_text().replace("topic 3", "topic 33"))
    refused(lens("sweep", *args), "dataset_sha256")


def _beir(tmp_path, corpus, queries, qrels):
    folder = tmp_path / "beir"
    folder.mkdir(exist_ok=True)
    (folder / "corpus.jsonl").write_bytes(corpus if isinstance(corpus, bytes) else
                                          "".join(json.dumps(r) + "\n" for r in corpus).encode())
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (folder / "qrels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qrels))
    return folder


def test_beir_inputs(tmp_path):
    docs = [{"_id": "d0", "text": "a"}, {"_id": "d1", "text": "b"}]
    qrels = [{"query-id": "q0", "corpus-id": "d0", "score": 0.5}]
    data = load_beir(_beir(tmp_path, docs, [{"_id": "q0", "text": "x"}], qrels))
    assert data.qrels == {"q0": {"d0": 0.5}}  # graded scores kept, 0.5 is relevant
    with pytest.raises(LensError, match="query id 'q0' appears more than once"):
        load_beir(_beir(tmp_path, docs, [{"_id": "q0", "text": "x"}, {"_id": "q0", "text": "y"}], qrels))
    with pytest.raises(LensError, match="'text' of 'd1' is a int, not a string"):
        load_beir(_beir(tmp_path, [docs[0], {"_id": "d1", "text": 5}], [{"_id": "q0", "text": "x"}], qrels))
    with pytest.raises(LensError, match="not UTF-8 text"):
        load_beir(_beir(tmp_path, b'{"_id": "d0", "text": "\xff\xfe"}\n', [{"_id": "q0", "text": "x"}], qrels))


class _WordTokenizer:
    def __call__(self, texts, add_special_tokens=False):
        class Out:
            pass
        out = Out()
        encode = lambda t: [ord(c) for c in t]  # noqa: E731
        out.input_ids = [encode(t) for t in texts] if isinstance(texts, list) else encode(texts)
        return out

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_truncation_cuts_the_text_never_the_code():
    data = Dataset("long", [Document("d0", "word " * 50), Document("d1", "short")], [Query("q0", "x")], {"q0": {"d0": 1}})
    pool = build_pool_layout(data, _WordTokenizer(), LayoutConfig(code_position="end", max_doc_tokens=30, truncate=True))
    text = "".join(map(chr, pool.doc_token_ids[0]))
    assert pool.truncated == 1 and len(pool.doc_token_ids[0]) <= 30
    assert text.endswith(f" [{pool.codes[0]}]\n")


def test_torn_and_foreign_parts_are_redone_and_two_writers_are_refused(tmp_path):
    from lens.paths import exclusive_lock

    args = [*TINY, "--n", "4,8", "--batch", "2"]
    out, other = tmp_path / "out", tmp_path / "other"
    assert lens("sweep", *args, "--out", str(out)).returncode == 0
    expected = pd.read_parquet(out / "records.parquet")
    other_args = ["--model", "tiny-llama", "--dataset", "synthetic-limit:docs=12,items=4,queries=4,seed=5",
                  "--queries", "4", "--dtype", "float32", "--n", "4,8", "--batch", "2"]
    assert lens("sweep", *other_args, "--out", str(other)).returncode == 0
    (out / "parts" / "n4-b0.parquet").write_bytes(b"")  # torn
    (out / "parts" / "n8-b1.parquet").write_bytes((other / "parts" / "n4-b1.parquet").read_bytes())  # foreign
    again = lens("sweep", *args, "--out", str(out))
    assert again.returncode == 0 and "redoing that unit" in again.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(out / "records.parquet"), expected)
    with exclusive_lock(tmp_path / ".out.lock", "held by the test"):  # as a second sweep holds it
        refused(lens("sweep", *args, "--out", str(out)), "in use by another lens process")
    (tmp_path / "a-file").write_text("x")
    refused(lens("sweep", *args, "--out", str(tmp_path / "a-file")), "is a file, not a folder")


def test_report_refuses_bad_records_and_arguments(tmp_path):
    out = tmp_path / "out"
    assert lens("sweep", *TINY, "--n", "4", "--out", str(out)).returncode == 0
    refused(lens("report", str(out), "--n", "12345"), "--n 12345", "N = 4")
    refused(lens("report", str(out), "--layer", "99"), "--layer 99", "layers 0..2")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "records.parquet").write_bytes(b"garbage")
    for text, words in [("{nope", "not valid JSON"), ('{"runs": []}', "no runs"), ("[1, 2]", "no runs")]:
        (bad / "summary.json").write_text(text)
        refused(lens("report", str(bad)), words)
    (bad / "summary.json").write_text((out / "summary.json").read_text())
    refused(lens("report", str(bad)), "records.parquet", "unreadable")
    refused(lens("report", str(out / "summary.json")), "is a file")


def test_damaged_checkpoints_are_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    from lens.models.loading import hf_config_dict
    from lens.models.registry import TINY_CONFIGS, load_model, tiny_state_dict

    cfg = TINY_CONFIGS["tiny-llama"]
    folder = tmp_path / "ckpt"
    folder.mkdir()
    hf = hf_config_dict(cfg)
    (folder / "config.json").write_text(json.dumps(hf))
    state = tiny_state_dict(cfg, 0)
    state["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, folder / "model.safetensors")
    with pytest.raises(LensError, match="holds NaN or infinite values"):
        load_model(folder)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(LensError, match="not a readable safetensors file"):
        load_model(folder)
    del hf["hidden_size"]
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(LensError, match="missing or not a positive integer: hidden_size"):
        load_model(folder)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_extreme_but_finite_settings_keep_masses_in_range_and_json_strict(tmp_path, dtype):
    out = tmp_path / "out"
    args = ["--model", "tiny-llama", "--dataset", "synthetic-limit:docs=30,items=5,queries=6", "--queries", "6",
            "--n", "30", "--dtype", dtype, "--out", str(out)]
    for spec in ["ssmax:s=50", "temperature:t=0.001", "scale-heads:layer=1,heads=0|1,factor=1000", "sink:b=-1e4"]:
        args += ["--intervention", spec]
    done = lens("sweep", *args)
    assert done.returncode == 0, done.stderr[-1500:]
    json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    records = pd.read_parquet(out / "records.parquet")
    assert records.query("level == 'head'").gold_mass.between(0, 1).all()
    assert records.query("level == 'layer'").layer_gold_mass.between(0, 1).all()


@pytest.mark.parametrize("script", ["table_models.py", "gold_ranks.py"])
def test_a_table_script_given_a_folder_without_records_says_so_and_prints_no_table(script, tmp_path):
    path = Path(__file__).parents[2] / "experiments" / script
    result = subprocess.run([sys.executable, str(path), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == "", (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr and str(tmp_path) in lines[0], result.stderr
    assert "lens sweep --out" in lines[0], lines[0]
