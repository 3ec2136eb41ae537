"""The LIMIT-structure generator: the pairs design holds exactly, and the evaluation half never
shares an item or a name (part) with the training half."""

import itertools
import re

import pytest

from lens.data.datasets import limit_pairs_dataset, load_dataset
from lens.data.limit_words import limit_items, limit_names
from lens.errors import LensError

ITEMS = re.compile(r"^(?P<name>.+?) likes (?P<items>.+)\.$")


def liked(doc_text: str) -> list[str]:
    items = ITEMS.match(doc_text).group("items")
    head, _, last = items.rpartition(", and ")
    return (head.split(", ") if head else []) + [last]


@pytest.mark.parametrize("n_docs", [5, 16, 46])
def test_every_pair_shares_exactly_one_item_nobody_else_likes(n_docs):
    data = limit_pairs_dataset(n_docs=n_docs, seed=1)
    docs = [set(liked(d.text)) for d in data.documents]
    assert all(len(items) == n_docs - 1 for items in docs)
    for a, b in itertools.combinations(range(n_docs), 2):
        shared = docs[a] & docs[b]
        assert len(shared) == 1
        (item,) = shared
        assert sum(item in d for d in docs) == 2
    assert len(data.queries) == n_docs * (n_docs - 1) // 2
    for q in data.queries:
        item = q.text.removeprefix("Who likes ").removesuffix("?")
        holders = {f"d{i}" for i, d in enumerate(docs) if item in d}
        assert holders == set(data.qrels[q.id]) and len(holders) == 2


def test_distractors_never_like_a_query_item_and_are_as_long():
    data = limit_pairs_dataset(n_docs=200, core=12, seed=0)
    asked = {q.text.removeprefix("Who likes ").removesuffix("?") for q in data.queries}
    for d in data.documents[12:]:
        items = liked(d.text)
        assert len(items) == 11 and not asked & set(items)
    assert len({ITEMS.match(d.text).group("name") for d in data.documents}) == 200  # unique names


def test_evaluation_half_shares_no_item_and_no_name_part_with_training():
    assert not set(limit_items("train")) & set(limit_items("eval"))
    train_parts = {p for n in limit_names("train") for p in n.split()}
    eval_parts = {p for n in limit_names("eval") for p in n.split()}
    assert not train_parts & eval_parts
    assert min(len(limit_items(s)) for s in ("train", "eval")) >= 64 * 63 // 2  # N up to 64
    train = set(limit_items("train"))
    data = limit_pairs_dataset(n_docs=46, split="eval", seed=0)
    assert not any(i in train for d in data.documents for i in liked(d.text))
    assert all(w[0].isupper() for d in data.documents for i in liked(d.text) for w in i.split())


def test_spec_and_bad_options():
    data = load_dataset("limit-pairs:docs=10,queries=7,seed=2")
    assert (len(data.documents), len(data.queries)) == (10, 7)
    assert load_dataset("limit-pairs:docs=10,seed=2").content_hash() != load_dataset("limit-pairs:docs=10,seed=3").content_hash()
    for spec, message in [("limit-pairs:docs=80", "use core <= 64"), ("limit-pairs:docs=10,queries=99", "1..45"),
                          ("limit-pairs:docs=10,split=test", "choose one of train, eval"),
                          ("limit-pairs:docs=10,core=20", "core must be"),
                          ("limit-pairs:docs=10,order=sorted", "choose one of random, pairs")]:
        with pytest.raises(LensError, match=re.escape(message)):
            load_dataset(spec)


def test_the_first_queries_are_a_uniform_sample_of_the_pairs():
    """A sweep takes the first K queries: in the default order they name every document about
    equally often; in pair order they name the first few documents."""
    def relevant_counts(order):
        data = load_dataset(f"limit-pairs:docs=46,order={order}")
        counts = [0] * 46
        for q in data.queries[:128]:
            for d in data.qrels[q.id]:
                counts[int(d[1:])] += 1
        return counts

    uniform, paired = relevant_counts("random"), relevant_counts("pairs")
    assert sum(uniform) == sum(paired) == 256
    assert paired[0] == paired[1] == 45 and max(uniform) <= 15  # 256/46 = 5.6 per document on average
    same = {o: load_dataset(f"limit-pairs:docs=46,order={o}") for o in ("random", "pairs")}
    assert {q.id for q in same["random"].queries} == {q.id for q in same["pairs"].queries}
    assert same["random"].qrels == same["pairs"].qrels
