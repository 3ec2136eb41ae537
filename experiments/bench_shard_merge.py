"""Sharded corpus attention: the merge's cost beside one stream over the whole corpus.

One readout row per stream (the sweep's decoding case), SmolLM2's attention shapes (9 query heads,
3 KV heads, head size 64), documents of 100 keys, statistics and routing maxima kept.  For K
shards it times each shard's pass over its own keys (what a worker does), the merge of the K
parts on the driver, and prints the merge's share of the one-stream time and the bytes one part
carries per stream and layer (what crosses the network).

    .venv/bin/python experiments/bench_shard_merge.py --keys 100000,1000000 --shards 2,4
"""

from __future__ import annotations

import argparse
import time

import torch


def _stream(q, n_docs, n_keys, n_self):
    from kernels.corpus_attention import CorpusAttentionStream

    return CorpusAttentionStream(q, n_docs, n_corpus_keys=n_keys, n_docs_attended=n_docs, n_self=n_self, layer=0,
                                 scale=0.125, gold_docs=[1], stats=True, route_stats=True, stats_rows="last")


def _feed(stream, keys, values, key_doc, chunk=65536):
    from kernels.corpus_attention import iter_chunks

    for part in iter_chunks(keys, values, key_doc, chunk):
        stream.update(*part)


def _best(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", default="100000,1000000", help="corpus sizes in keys, comma-separated")
    parser.add_argument("--shards", default="2,4")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    args = parser.parse_args()
    from kernels.shard_merge import merge_parts, shard_docs, shard_documents, shard_part
    from lens.backend import resolve_dtype, stamp

    dtype = resolve_dtype(args.dtype)
    print(stamp(dtype))
    g = torch.Generator().manual_seed(0)
    for n_keys in [int(x) for x in args.keys.split(",")]:
        n_docs = n_keys // 100
        key_doc = torch.arange(n_docs).repeat_interleave(100)
        keys = torch.randn(3, n_keys, 64, generator=g).to(dtype)
        values = torch.randn(3, n_keys, 64, generator=g).to(dtype)
        q = torch.randn(9, 1, 64, generator=g).to(dtype)
        self_k, self_v = keys[:, :1].clone(), values[:, :1].clone()

        def whole():
            s = _stream(q, n_docs, n_keys, 1)
            _feed(s, keys, values, key_doc)
            return s.finish(self_k, self_v)

        t_whole = _best(whole, args.repeat)
        print(f"keys={n_keys:>9,} docs={n_docs:>6,}  one stream {t_whole * 1e3:8.1f} ms")
        for k in [int(x) for x in args.shards.split(",")]:
            shards = shard_documents(key_doc, k)
            local = [(keys[:, i].contiguous(), values[:, i].contiguous(), key_doc[i], shard_docs(key_doc, i))
                     for i in shards]
            parts, t_shards = [], []
            for kk, vv, dd, docs in local:
                def one(kk=kk, vv=vv, dd=dd, docs=docs):
                    s = _stream(q, n_docs, n_keys, 1)
                    _feed(s, kk, vv, dd)
                    return shard_part(s, docs)
                t_shards.append(_best(one, args.repeat))
                parts.append(one())
            t_merge = _best(lambda: merge_parts(_stream(q, n_docs, n_keys, 1), parts).finish(self_k, self_v),
                            args.repeat)
            merged = merge_parts(_stream(q, n_docs, n_keys, 1), parts).finish(self_k, self_v)
            ref = whole()
            err = float((merged.output.float() - ref.output.float()).abs().max())
            print(f"  {k} shards: slowest shard {max(t_shards) * 1e3:8.1f} ms, merge {t_merge * 1e3:7.2f} ms "
                  f"= {t_merge / t_whole:.1%} of one stream; part {parts[0].nbytes() / 1e3:,.0f} kB per stream "
                  f"and layer; max |output diff| {err:.1e}")


if __name__ == "__main__":
    main()
