"""Datasets, generators, layout and corpora; bad input gives one clear line."""

import json
import re
from collections import Counter

import pytest

from lens.data.datasets import limit_dataset, load_beir, load_dataset, needle_dataset
from lens.data.layout import LayoutConfig, assign_codes, build_pool_layout, corpus_for_query, dense_layout
from lens.data.words import FIRST_NAMES, LAST_NAMES, LIKEABLE_ITEMS
from lens.errors import LensError


def write_beir(folder, corpus=None, queries=None, qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\nq2\td3\t0\n"):
    corpus = corpus if corpus is not None else [{"_id": f"d{i}", "title": f"T{i}", "text": f"text {i}"} for i in range(1, 5)]
    queries = queries if queries is not None else [{"_id": "q1", "text": "first?"}, {"_id": "q2", "text": "second?"}]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    if qrels is not None:
        (folder / "qrels").mkdir(exist_ok=True)
        (folder / "qrels" / "test.tsv").write_text(qrels)
    return folder


def one_line_error(fn, *args, match, **kwargs):
    with pytest.raises(LensError) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message and re.search(match, message), message
    return message


def test_load_beir_tsv_and_jsonl(tmp_path):
    ds = load_beir(write_beir(tmp_path / "a"))
    assert [q.id for q in ds.queries] == ["q1", "q2"]
    assert ds.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2}}  # score 0 is not relevant
    assert ds.gold("q2") == [1]
    assert ds.documents[0].title == "T1"
    b = write_beir(tmp_path / "b", qrels=None)
    (b / "qrels.jsonl").write_text(json.dumps({"query-id": "q1", "corpus-id": "d4", "score": 1}) + "\n"
                                   + json.dumps({"query-id": "q2", "corpus-id": "d1", "score": 1}) + "\n")
    assert load_beir(b).qrels == {"q1": {"d4": 1}, "q2": {"d1": 1}}


def test_malformed_jsonl_names_file_and_line(tmp_path):
    folder = write_beir(tmp_path / "x")
    lines = (folder / "corpus.jsonl").read_text().splitlines()
    lines[2] = '{"_id": "d3", "text": '
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    one_line_error(load_beir, folder, match=r"corpus\.jsonl:3: malformed JSON")


def test_missing_field_names_line(tmp_path):
    folder = write_beir(tmp_path / "x", queries=[{"_id": "q1", "text": "a"}, {"_id": "q2"}])
    one_line_error(load_beir, folder, match=r"queries\.jsonl:2: missing field\(s\) text")


def test_qrels_with_unknown_ids(tmp_path):
    one_line_error(load_beir, write_beir(tmp_path / "a", qrels="q1\td9\t1\nq2\td1\t1\n"),
                   match="corpus id 'd9' .* not in corpus.jsonl")
    one_line_error(load_beir, write_beir(tmp_path / "b", qrels="q7\td1\t1\n"), match="query id 'q7' is not in queries.jsonl")


def test_query_without_qrels_is_an_error_unless_dropped(tmp_path):
    folder = write_beir(tmp_path / "a", qrels="q1\td1\t1\n")
    one_line_error(load_beir, folder, match="'q2'.* no positive qrels .* --drop-unjudged")
    assert [q.id for q in load_beir(folder, drop_unjudged=True).queries] == ["q1"]


def test_not_a_beir_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(load_dataset, str(tmp_path / "empty"), match="no corpus.jsonl; not a BEIR-format folder")
    one_line_error(load_dataset, "no-such-thing", match="not a folder, 'synthetic-limit")
    one_line_error(load_dataset, "synthetic-limit:docs=x", match="docs='x' is not a int")
    one_line_error(load_dataset, "synthetic-limit:size=3", match="unknown option 'size=3'")


def test_limit_generator():
    ds = limit_dataset(n_docs=50, items_per_doc=8, n_queries=20, seed=5)
    assert ds == limit_dataset(n_docs=50, items_per_doc=8, n_queries=20, seed=5)  # seeded
    assert ds.documents != limit_dataset(n_docs=50, items_per_doc=8, n_queries=20, seed=6).documents
    for doc in ds.documents:
        m = re.fullmatch(r"(\w+ \w+) likes (.+)\.", doc.text)
        assert m and ", and " in m.group(2)
        assert len(m.group(2).replace(", and ", ", ").split(", ")) == 8
    for query in ds.queries:
        item = re.fullmatch(r"Who likes (.+)\?", query.text).group(1)
        holders = {d.id for d in ds.documents if re.search(rf"(likes |, |and ){re.escape(item)}(,|\.)", d.text)}
        assert holders == set(ds.qrels[query.id]) and len(holders) == 2
    assert len({d.text.split(" likes ")[0] for d in ds.documents}) == 50  # unique people


def test_word_lists_are_unique():
    for words in (LIKEABLE_ITEMS, FIRST_NAMES, LAST_NAMES):
        assert not [w for w, c in Counter(words).items() if c > 1]


def test_needle_generator():
    ds = needle_dataset(n_docs=30, n_queries=10, seed=2)
    for q in ds.queries:
        key = q.text.removeprefix("What is the secret word for ").removesuffix("?")
        (gold,) = ds.qrels[q.id]
        assert key in ds.documents[ds.doc_index(gold)].text
        assert sum(key + " is" in d.text for d in ds.documents) == 1


def test_corpora_are_nested_across_n_and_hold_the_gold():
    ds = limit_dataset(n_docs=60, items_per_doc=6, n_queries=5, seed=1)
    previous = set()
    for n in (2, 5, 17, 60):
        corpus, gold_pos = corpus_for_query(ds, "q3", n, seed=4)
        assert len(corpus) == len(set(corpus)) == n
        assert sorted(corpus[p] for p in gold_pos) == ds.gold("q3")
        assert previous <= set(corpus)
        previous = set(corpus)
    one_line_error(corpus_for_query, ds, "q3", 61, match="N=61 is larger than the pool of 60 documents")
    one_line_error(corpus_for_query, ds, "q3", 1, match="cannot hold the 2 gold documents")


def test_codes_fixed_unique_and_bounded():
    codes = assign_codes(500, seed=3)
    assert codes == assign_codes(500, seed=3) and len(set(codes)) == 500
    assert all(re.fullmatch(r"\d{4}", c) for c in codes)
    one_line_error(assign_codes, 10_001, 0, match="cannot carry unique four-digit codes")


class _CharTokenizer:
    """A stand-in tokenizer (one id per character) to test the layout without model files."""

    def __call__(self, texts, add_special_tokens=False):
        class Out:
            pass
        out = Out()
        out.input_ids = [list(map(ord, t)) for t in texts] if isinstance(texts, list) else list(map(ord, texts))
        return out

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_long_documents_error_or_truncate_explicitly():
    ds = limit_dataset(n_docs=6, items_per_doc=10, n_queries=2, seed=0)
    one_line_error(build_pool_layout, ds, _CharTokenizer(), LayoutConfig(max_doc_tokens=40),
                   match=r"document 'd\d' has \d+ tokens, more than max_doc_tokens=40; .*--truncate")
    pool = build_pool_layout(ds, _CharTokenizer(), LayoutConfig(max_doc_tokens=40, truncate=True))
    assert pool.truncated == 6 and max(map(len, pool.doc_token_ids)) == 40


@pytest.mark.parametrize("scheme", ["shared", "restart", "sequential"])
def test_dense_layout_positions_and_mask(scheme):
    ds = limit_dataset(n_docs=6, items_per_doc=3, n_queries=2, seed=0)
    pool = build_pool_layout(ds, _CharTokenizer(), LayoutConfig(positions=scheme, query_offset=500))
    corpus, _ = corpus_for_query(ds, "q0", 4)
    lay = dense_layout(pool, corpus, [1, 2, 3])
    n_inst = len(pool.instruction_ids)
    lens_ = [len(pool.doc_token_ids[d]) for d in corpus]
    first_doc = slice(n_inst, n_inst + lens_[0])
    second_start = n_inst + lens_[0]
    assert lay.positions[first_doc][0] == {"shared": n_inst, "restart": 0, "sequential": n_inst}[scheme]
    assert lay.positions[second_start] == {"shared": n_inst, "restart": 0, "sequential": n_inst + lens_[0]}[scheme]
    assert lay.positions[lay.query_slice][0] == (500 if scheme != "sequential" else n_inst + sum(lens_))
    assert not lay.mask[second_start, n_inst]  # documents never see each other
    assert lay.mask[second_start, : n_inst].all()  # ... but see the instruction
    assert lay.mask[lay.query_slice.start, : lay.query_slice.start].all()  # the query sees everything
    assert (lay.key_doc[first_doc] == 0).all() and (lay.key_doc[lay.query_slice] == -1).all()


def test_query_offset_must_clear_the_documents():
    ds = limit_dataset(n_docs=6, items_per_doc=3, n_queries=2, seed=0)
    pool = build_pool_layout(ds, _CharTokenizer(), LayoutConfig(query_offset=50))
    one_line_error(dense_layout, pool, corpus_for_query(ds, "q0", 3)[0], [1], match="query_offset=50 overlaps")
    one_line_error(LayoutConfig, positions="random", match="choose one of shared, restart, sequential")


def test_a_beir_split_is_chosen_by_name(tmp_path):
    from lens.data.datasets import load_dataset

    folder = write_beir(tmp_path / "s")
    (folder / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td3\t1\n")
    assert load_dataset(str(folder)).qrels == {"q1": {"d1": 1}, "q2": {"d2": 2}}  # test by default
    assert load_dataset(str(folder), split="dev", drop_unjudged=True).qrels == {"q1": {"d3": 1}}
    one_line_error(load_dataset, str(folder), split="train", match=r"no qrels \(looked for qrels/train\.tsv")
    one_line_error(load_dataset, "limit-pairs:docs=8", split="dev", match="only a BEIR folder has qrels splits")
