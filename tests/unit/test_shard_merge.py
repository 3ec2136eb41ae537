"""Documents sharded across workers: merging the shards' parts gives what one stream over the
whole corpus gives (output, lse, per-document statistics, gold output, routing), to 1e-6."""

import pytest
import torch

from kernels.corpus_attention import CorpusAttentionStream, iter_chunks, kept_keys
from kernels.interventions import Sink, SSMax
from kernels.score_functions import Route
from kernels.shard_merge import merge_parts, shard_docs, shard_documents, shard_part


def _corpus(seed=0, heads=6, kv=2, d=16, n_docs=40, q=3, s=5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 30, (n_docs,), generator=g).tolist()
    key_doc = torch.tensor([-1] * 7 + [j for j, n in enumerate(lengths) for _ in range(n)])
    t = key_doc.numel()
    return dict(q=torch.randn(heads, q, d, generator=g), keys=torch.randn(kv, t, d, generator=g),
                values=torch.randn(kv, t, d, generator=g), key_doc=key_doc, n_docs=n_docs,
                self_k=torch.randn(kv, s, d, generator=g), self_v=torch.randn(kv, s, d, generator=g))


def _stream(c, fn, n_keys, n_attended, stats_rows):
    return CorpusAttentionStream(c["q"], c["n_docs"], n_corpus_keys=n_keys, n_docs_attended=n_attended,
                                 n_self=c["self_k"].shape[1], layer=1, scale=0.25, score_fn=fn, gold_docs=[3, 17],
                                 stats=True, route_stats=True, stats_rows=stats_rows, route_mean=True,
                                 route_chunks={4: 8, 16: 2})


def _whole(c, fn, keep, stats_rows):
    kept = kept_keys(c["key_doc"], keep)
    n_keys = int(kept.sum()) if kept is not None else c["key_doc"].numel()
    stream = _stream(c, fn, n_keys, int(keep.sum()) if keep is not None else c["n_docs"], stats_rows)
    for chunk in iter_chunks(c["keys"], c["values"], c["key_doc"], 64, keep):
        stream.update(*chunk)
    return stream.finish(c["self_k"], c["self_v"]), n_keys


def _sharded(c, fn, keep, n_keys, n_shards, stats_rows):
    n_attended = int(keep.sum()) if keep is not None else c["n_docs"]
    parts = []
    for index in shard_documents(c["key_doc"], n_shards):  # each worker: its documents only
        stream = _stream(c, fn, n_keys, n_attended, stats_rows)
        keys, values, key_doc = c["keys"][:, index], c["values"][:, index], c["key_doc"][index]
        for chunk in iter_chunks(keys, values, key_doc, 64, keep):
            stream.update(*chunk)
        parts.append(shard_part(stream, shard_docs(c["key_doc"], index)))
    driver = _stream(c, fn, n_keys, n_attended, stats_rows)
    inst = c["key_doc"] < 0
    driver.update(c["keys"][:, inst], c["values"][:, inst], c["key_doc"][inst])
    return merge_parts(driver, parts).finish(c["self_k"], c["self_v"])


def _close(a, b):
    for name in ("output", "lse", "doc_max", "doc_lse", "gold_output", "route_max", "route_mean"):
        x, y = getattr(a, name).float(), getattr(b, name).float()
        assert torch.allclose(x, y, atol=1e-6, rtol=1e-6, equal_nan=True), (name, float((x - y).abs().nan_to_num().max()))
    assert a.route_chunk.keys() == b.route_chunk.keys() == {4, 16}
    for chunk in (4, 16):  # chunk-mean routing: documents of up to 29 keys, 8 chunks of 4 or 2 of 16 (the last takes the rest)
        assert torch.allclose(a.route_chunk[chunk], b.route_chunk[chunk], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("n_shards", [1, 2, 4])
@pytest.mark.parametrize("fn", [None, SSMax(0.4, n="docs") + Sink(2.0), SSMax(0.5)])
@pytest.mark.parametrize("stats_rows", ["last", "all"])
def test_shards_merge_to_the_whole_corpus(n_shards, fn, stats_rows):
    c = _corpus()
    whole, n_keys = _whole(c, fn, None, stats_rows)
    _close(_sharded(c, fn, None, n_keys, n_shards, stats_rows), whole)


@pytest.mark.parametrize("n_shards", [2, 4])
def test_routing_across_shards_keeps_the_corpus_top_b(n_shards):
    """Route layer: the merged routing maxima choose the same top B as one stream; the next layer,
    each shard feeding its kept documents only, merges to the routed corpus's attention."""
    c, route = _corpus(seed=1), Route(layer=1, B=6)
    whole, n_keys = _whole(c, None, None, "last")
    merged = _sharded(c, None, None, n_keys, n_shards, "last")
    keep = route.keep(merged.route_max, c["n_docs"])
    assert torch.equal(keep, route.keep(whole.route_max, c["n_docs"])) and int(keep.sum()) == 6
    routed, kept_keys_count = _whole(c, SSMax(0.4, n="docs"), keep, "last")
    _close(_sharded(c, SSMax(0.4, n="docs"), keep, kept_keys_count, n_shards, "last"), routed)
    assert torch.isinf(routed.doc_max[..., ~keep]).all()  # documents not kept are not attended


def test_shards_hold_whole_documents():
    key_doc = _corpus()["key_doc"]
    shards = shard_documents(key_doc, 4)
    together = torch.cat(shards)
    assert torch.equal(together.sort().values, (key_doc >= 0).nonzero().squeeze(1))
    docs = [set(key_doc[s].tolist()) for s in shards]
    assert all(a.isdisjoint(b) for i, a in enumerate(docs) for b in docs[i + 1:])
