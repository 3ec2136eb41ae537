"""The disk-backed KV cache: same numbers as the in-memory path; corrupt, truncated and
interrupted caches are detected, rebuilt or resumed, never silently used."""

import pytest
import torch

import lens.runtime.kv.disk as kv_store
from kernels.spec import parse_intervention
from lens.data.datasets import limit_dataset
from lens.data.layout import LayoutConfig
from lens.runtime import BlockSearchRunner
from lens.errors import LensError

REQUESTS = [("q0", 4, None), ("q1", 17, "ssmax:s=0.4,n=docs"), ("q2", 40, "route:layer=1,B=5"), ("q3", 40, None),
            ("q4", 9, "sink:b=2+temperature:t=0.7")]


@pytest.fixture(scope="module")
def data():
    return limit_dataset(n_docs=40, items_per_doc=5, n_queries=6, seed=9)


def _runs(runner):
    streams = [runner.stream(q, n, parse_intervention(fn) if fn else None) for q, n, fn in REQUESTS]
    return runner.run_streams(streams)


def _same(a_runs, b_runs):
    # Both caches hold the same KV bits (test_document_kv_does_not_depend_on_what_was_prefilled_before),
    # but the disk path reads the corpus in other chunks (37 tokens here), so the online softmax
    # sums in another order: fp32 rounding, hence 1e-4.
    for a, b in zip(a_runs, b_runs):
        assert a.decoded == b.decoded and a.routed == b.routed
        assert torch.allclose(a.readout_logits, b.readout_logits, atol=1e-4)
        for x, y in zip(a.layers, b.layers):
            assert torch.allclose(x.doc_lse, y.doc_lse, atol=1e-4)
            assert torch.allclose(x.gold_output, y.gold_output, atol=1e-4)


def test_disk_equals_memory(models, data, tmp_path):
    model = models("tiny-qwen3")
    memory = BlockSearchRunner(model, data, progress=False, batch_tokens=100)
    disk = BlockSearchRunner(model, data, progress=False, batch_tokens=100, kv="disk", kv_folder=tmp_path)
    disk.source.chunk_tokens = 37  # documents straddle read chunks
    _same(_runs(disk), _runs(memory))
    # the gold of a small-N corpus usually lies past the shared prefix: it is read separately
    assert any(disk.source._plan(s)[1] for s in [disk.stream("q0", 4)])


def test_document_kv_does_not_depend_on_what_was_prefilled_before(models, data, tmp_path):
    # A padded batch's width and row count change the order of float sums, so a document's KV is
    # bit-stable only if its batch is fixed: asked for in two orders, and built on disk, the
    # documents' KV must be the same bits (a resumed sweep then writes identical records).
    model = models("tiny-llama")
    stepwise = BlockSearchRunner(model, data, progress=False, batch_tokens=100)
    for q, n in (("q0", 4), ("q1", 9), ("q2", 17)):
        stepwise.prefill(stepwise.corpus(q, n)[0])
    everything = list(range(len(data.documents)))
    stepwise.prefill(everything)
    at_once = BlockSearchRunner(model, data, progress=False, batch_tokens=100)
    at_once.prefill(everything)
    disk = BlockSearchRunner(model, data, progress=False, batch_tokens=100, kv="disk", kv_folder=tmp_path).source
    assert len(stepwise.source.batches) > 3 and len(stepwise.source) == len(at_once.source) == len(everything)
    start = stepwise.source.starts([0])[0]
    for d in everything:
        a, b = (r.source._store[r.source._key(d, start)] for r in (stepwise, at_once))
        first, n = int(disk.doc_offsets[disk.rank[d]]), len(disk.pool.doc_token_ids[d])
        for layer in range(model.cfg.n_layers):
            keys, values = disk._read(layer, first, first + n)
            assert torch.equal(a.keys[layer], b.keys[layer]) and torch.equal(a.values[layer], b.values[layer])
            assert torch.equal(a.keys[layer], keys) and torch.equal(a.values[layer], values)
    disk.close()


def test_sequential_document_kv_does_not_depend_on_what_was_prefilled_before(models, data):
    # Under sequential positions a document's start depends on its corpus, so a corpus's batches
    # are its own; documents another corpus left at the same starts must not leak into them.
    model = models("tiny-llama")
    layout = LayoutConfig(positions="sequential")
    runners = [BlockSearchRunner(model, data, layout, progress=False, batch_tokens=100) for _ in range(2)]
    corpus = runners[0].corpus("q0", 30)[0]
    for q, n in (("q0", 9), ("q0", 20), ("q1", 30)):
        runners[0].prefill(runners[0].corpus(q, n)[0])
    for r in runners:
        r.prefill(corpus)
    a, b = (r.source._corpus_kv(corpus) for r in runners)
    assert all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))


def test_corrupt_and_truncated_caches_are_rebuilt(models, data, tmp_path, capsys):
    model = models("tiny-llama")
    first = BlockSearchRunner(model, data, progress=False, kv="disk", kv_folder=tmp_path)
    root = first.source.root
    expected = _runs(first)
    first.source.close()

    layer_file = root / "layer_001.bin"
    raw = bytearray(layer_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    layer_file.write_bytes(bytes(raw))
    again = BlockSearchRunner(model, data, progress=False, kv="disk", kv_folder=tmp_path)
    assert "layer_001.bin fails its checksum (corrupt)" in capsys.readouterr().err
    _same(_runs(again), expected)
    again.source.close()

    with (root / "layer_002.bin").open("r+b") as f:
        f.truncate(100)
    third = BlockSearchRunner(model, data, progress=False, kv="disk", kv_folder=tmp_path)
    assert "layer_002.bin has 100 bytes" in capsys.readouterr().err
    _same(_runs(third), expected)


def _dying_prefill(calls: dict, at: int = 4):
    """kv_store's prefill_batch, raising KeyboardInterrupt (a kill) at its ``at``-th call."""
    real = kv_store.prefill_batch

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return dying


def _killed_build(model, data, folder, monkeypatch):
    """A disk KV build of ``data`` into ``folder`` killed at its fourth batch; its .partial folder."""
    real = kv_store.prefill_batch
    monkeypatch.setattr(kv_store, "prefill_batch", _dying_prefill({"n": 0}))
    with pytest.raises(KeyboardInterrupt):
        BlockSearchRunner(model, data, progress=False, batch_tokens=120, kv="disk", kv_folder=folder)
    monkeypatch.setattr(kv_store, "prefill_batch", real)
    return next(folder.glob("*.partial"))


def test_interrupted_build_resumes(models, data, tmp_path, monkeypatch):
    model = models("tiny-llama")
    real = kv_store.prefill_batch
    calls = {"n": 0}
    dying = _dying_prefill(calls)
    monkeypatch.setattr(kv_store, "prefill_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        BlockSearchRunner(model, data, progress=False, batch_tokens=120, kv="disk", kv_folder=tmp_path)
    partial = next(tmp_path.glob("*.partial"))
    done = int(__import__("json").loads((partial / "progress.json").read_text())["docs_done"])
    assert 0 < done < 40 and not list(tmp_path.glob("*/manifest.json"))
    monkeypatch.setattr(kv_store, "prefill_batch", real)
    calls["n"] = 0
    resumed = BlockSearchRunner(model, data, progress=False, batch_tokens=120, kv="disk", kv_folder=tmp_path)
    assert not list(tmp_path.glob("*.partial"))
    fresh = BlockSearchRunner(model, data, progress=False, batch_tokens=120, kv="disk", kv_folder=tmp_path / "fresh")
    _same(_runs(resumed), _runs(fresh))


def test_sequential_positions_are_refused_on_disk(models, data, tmp_path):
    with pytest.raises(LensError, match="use positions shared or restart"):
        BlockSearchRunner(models("tiny-llama"), data, LayoutConfig(positions="sequential"), progress=False,
                          kv="disk", kv_folder=tmp_path)


def test_torn_or_foreign_partial_state_is_not_trusted(models, data, tmp_path, monkeypatch, capsys):
    """Bytes corrupted after a batch was committed, and a garbage progress file, are caught on
    resume: the build redoes them and ends equal to a fresh build."""
    import json

    model = models("tiny-llama")
    partial = _killed_build(model, data, tmp_path, monkeypatch)
    layer = partial / "layer_000.bin"
    raw = bytearray(layer.read_bytes())
    raw[0] ^= 0xFF  # the first committed batch's first key byte
    layer.write_bytes(bytes(raw))
    resumed = BlockSearchRunner(model, data, progress=False, batch_tokens=120, kv="disk", kv_folder=tmp_path)
    assert "fails its checksum; prefilling from there again" in capsys.readouterr().err
    fresh = BlockSearchRunner(model, data, progress=False, batch_tokens=120, kv="disk", kv_folder=tmp_path / "fresh")
    _same(_runs(resumed), _runs(fresh))
    resumed.source.close()

    other = tmp_path / "garbage"
    (_killed_build(model, data, other, monkeypatch) / "progress.json").write_text(json.dumps({"docs_done": "many"}))
    rebuilt = BlockSearchRunner(model, data, progress=False, batch_tokens=120, kv="disk", kv_folder=other)
    assert "unreadable or from another build" in capsys.readouterr().err
    _same(_runs(rebuilt), _runs(fresh))


def test_two_builds_of_one_cache_one_is_refused(models, data, tmp_path):
    from lens.paths import exclusive_lock

    probe = BlockSearchRunner(models("tiny-llama"), data, progress=False, kv="disk", kv_folder=tmp_path / "probe")
    key = probe.source.key
    probe.source.close()
    with exclusive_lock(tmp_path / f".{key}.lock", "held by the test"):  # as a concurrent build holds it
        with pytest.raises(LensError, match="in use by another lens process"):
            BlockSearchRunner(models("tiny-llama"), data, progress=False, kv="disk", kv_folder=tmp_path)
    BlockSearchRunner(models("tiny-llama"), data, progress=False, kv="disk", kv_folder=tmp_path).source.close()


def test_bf16_kv_under_an_fp32_model(models, data, tmp_path):
    """KV cached in bf16 under an fp32 model (fp32 queries over bf16 keys and values): memory and
    disk hold the same bits, and the runs stay within bf16 rounding of the fp32 cache's."""
    model = models("tiny-qwen3")
    exact = BlockSearchRunner(model, data, progress=False, batch_tokens=100)
    memory = BlockSearchRunner(model, data, progress=False, batch_tokens=100, kv_dtype=torch.bfloat16)
    disk = BlockSearchRunner(model, data, progress=False, batch_tokens=100, kv="disk", kv_folder=tmp_path,
                             kv_dtype=torch.bfloat16)
    assert disk.source.itemsize == 2 and memory.source.instruction.keys.dtype == torch.bfloat16
    _same(_runs(disk), _runs(memory))
    for a, b in zip(_runs(memory), _runs(exact)):
        assert torch.allclose(a.readout_logits, b.readout_logits, atol=0.05)
        assert (a.readout_logits - b.readout_logits).abs().max() > 0  # the KV was rounded


def test_reads_are_views_of_the_mapped_file_that_never_write_it(models, data, tmp_path):
    """The kernels read the cache in place (no copy per read), and a tensor read from it cannot
    change the file: the map is copy-on-write."""
    model = models("tiny-qwen3")
    disk = BlockSearchRunner(model, data, progress=False, batch_tokens=100, kv="disk", kv_folder=tmp_path).source
    keys, values = disk._read(1, 5, 30)
    again, _ = disk._read(1, 0, 40)
    assert keys.untyped_storage().data_ptr() == again.untyped_storage().data_ptr()  # one map, not copies
    assert keys.stride(-1) == 1 and keys.stride(-2) == disk.d_head  # each head's rows contiguous (the kernels' layout)
    path = disk._layer_path(disk.root, 1)
    before = path.read_bytes()
    keys.fill_(7.0)
    assert torch.equal(again[:, 5:30], keys)  # the process sees its own write
    assert path.read_bytes() == before  # the file does not
    disk.close()
    reopened = BlockSearchRunner(model, data, progress=False, batch_tokens=100, kv="disk", kv_folder=tmp_path).source
    assert torch.equal(reopened._read(1, 0, 40)[0], torch.frombuffer(bytearray(before), dtype=disk.dtype).view(
        2, disk.n_kv, disk.n_tokens, disk.d_head)[0, :, 0:40])
