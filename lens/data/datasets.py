"""Corpora, queries and relevance judgements: BEIR folders and seeded synthetic generators."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lens.data.words import FIRST_NAMES, KEY_ADJECTIVES, KEY_NOUNS, LAST_NAMES, LIKEABLE_ITEMS
from lens.errors import LensError


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    title: str = ""


@dataclass(frozen=True)
class Query:
    id: str
    text: str


@dataclass
class Dataset:
    """A document pool, queries, and qrels (query id -> {document id: relevance > 0})."""

    name: str
    documents: list[Document]
    queries: list[Query]
    qrels: dict[str, dict[str, int | float]]  # graded relevance kept as given
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._index = {d.id: i for i, d in enumerate(self.documents)}
        if len(self._index) != len(self.documents):
            dup = next(i for i, n in Counter(d.id for d in self.documents).items() if n > 1)
            raise LensError(f"{self.name}: document id {dup!r} appears more than once")

    def content_hash(self) -> str:
        """A hash of every document, query and judgement: what a sweep's records depend on."""
        h = hashlib.sha256()
        for d in self.documents:
            h.update(json.dumps([d.id, d.title, d.text]).encode())
        for q in self.queries:
            h.update(json.dumps([q.id, q.text]).encode())
        h.update(json.dumps(sorted((q, sorted(r.items())) for q, r in self.qrels.items())).encode())
        return h.hexdigest()[:16]

    def doc_index(self, doc_id: str) -> int:
        return self._index[doc_id]

    def gold(self, query_id: str) -> list[int]:
        """Pool indices of the query's relevant documents."""
        return [self._index[d] for d in sorted(self.qrels[query_id], key=self._index.__getitem__)]


# ---------------------------------------------------------------------------------------- BEIR


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise LensError(f"{path}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from None
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise LensError(f"{path}:{line_no}: malformed JSON ({err.msg}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise LensError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in required if k not in row]
        if missing:
            raise LensError(f"{path}:{line_no}: missing field(s) {', '.join(missing)}")
        rows.append(row)
    return rows


def _score(value, where: str) -> int | float:
    """A relevance grade: kept as given (graded qrels stay graded), ints where whole."""
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise LensError(f"{where}: score {value!r} is not a number") from None
    if not math.isfinite(score):
        raise LensError(f"{where}: score {value!r} is not a finite number")
    return int(score) if score.is_integer() else score


def _text_field(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise LensError(f"{where}: {key!r} of {row.get('_id')!r} is a {type(value).__name__}, not a string; "
                        "write it as a JSON string")
    return value


def _read_qrels(folder: Path, split: str) -> tuple[Path, list[tuple[str, str, int]]]:
    tsv, jsonl = folder / "qrels" / f"{split}.tsv", folder / "qrels.jsonl"
    if tsv.is_file():
        out = []
        with tsv.open(encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t")
            for line_no, row in enumerate(reader, 1):
                if not row or (line_no == 1 and row[0] == "query-id"):
                    continue
                if len(row) < 3:
                    raise LensError(f"{tsv}:{line_no}: expected query-id<TAB>corpus-id<TAB>score, got {len(row)} field(s)")
                out.append((row[0], row[1], _score(row[2], f"{tsv}:{line_no}")))
        return tsv, out
    if jsonl.is_file():
        rows = _read_jsonl(jsonl, ("query-id", "corpus-id", "score"))
        return jsonl, [(str(r["query-id"]), str(r["corpus-id"]), _score(r["score"], str(jsonl))) for r in rows]
    raise LensError(f"{folder}: no qrels (looked for qrels/{split}.tsv and qrels.jsonl)")


def load_beir(folder: str | Path, split: str = "test", drop_unjudged: bool = False) -> Dataset:
    """Load a BEIR-format folder.  Queries with no positive qrels are an error unless
    ``drop_unjudged`` (then they are left out, and the count says so)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise LensError(f"{folder}: not a folder; a BEIR dataset is a folder with corpus.jsonl, queries.jsonl and qrels")
    for name in ("corpus.jsonl", "queries.jsonl"):
        if not (folder / name).is_file():
            raise LensError(f"{folder}: no {name}; not a BEIR-format folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
    corpus_path, queries_path = folder / "corpus.jsonl", folder / "queries.jsonl"
    docs = [
        Document(str(r["_id"]), _text_field(r, "text", str(corpus_path)), _text_field(r, "title", str(corpus_path)))
        for r in _read_jsonl(corpus_path, ("_id", "text"))
    ]
    queries = [Query(str(r["_id"]), _text_field(r, "text", str(queries_path)))
               for r in _read_jsonl(queries_path, ("_id", "text"))]
    repeated = next((i for i, n in Counter(q.id for q in queries).items() if n > 1), None)
    if repeated is not None:
        raise LensError(f"{queries_path}: query id {repeated!r} appears more than once; give every query its own _id")
    qrels_path, triples = _read_qrels(folder, split)
    doc_ids, query_ids = {d.id for d in docs}, {q.id for q in queries}
    qrels: dict[str, dict[str, int]] = {}
    for qid, did, score in triples:
        if qid not in query_ids:
            raise LensError(f"{qrels_path}: query id {qid!r} is not in queries.jsonl")
        if did not in doc_ids:
            raise LensError(f"{qrels_path}: corpus id {did!r} (for query {qid!r}) is not in corpus.jsonl")
        if score > 0:
            qrels.setdefault(qid, {})[did] = score
    unjudged = [q.id for q in queries if q.id not in qrels]
    if unjudged and not drop_unjudged:
        raise LensError(
            f"{folder}: {len(unjudged)} quer{'y' if len(unjudged) == 1 else 'ies'} (first {unjudged[0]!r}) "
            f"have no positive qrels in {qrels_path.name}; pass --drop-unjudged to leave them out"
        )
    queries = [q for q in queries if q.id in qrels]
    if not queries:
        raise LensError(f"{folder}: no query has a positive judgement in {qrels_path.name}")
    return Dataset(folder.name, docs, queries, qrels)


# ------------------------------------------------------------------------------- synthetic data


def _join_items(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


def limit_dataset(n_docs: int = 256, items_per_doc: int = 20, n_queries: int = 64, seed: int = 0) -> Dataset:
    """LIMIT-style data: "<First Last> likes A, B, ..., and Z."; queries "Who likes X?" with
    exactly two relevant documents each.  Items not asked about are drawn from a shared pool, so
    documents overlap heavily (hard negatives), as in LIMIT."""
    names = [f"{f} {l}" for f in FIRST_NAMES for l in LAST_NAMES]
    if n_docs > len(names):
        raise LensError(f"synthetic-limit: at most {len(names)} documents (unique names), asked for {n_docs}")
    if n_docs < 2:
        raise LensError("synthetic-limit: needs at least 2 documents (two relevant per query)")
    if not 1 <= items_per_doc <= 60:
        raise LensError(f"synthetic-limit: items per document must be 1..60, got {items_per_doc}")
    max_queries = min(len(LIKEABLE_ITEMS) - items_per_doc, n_docs * items_per_doc // 2)
    if not 1 <= n_queries <= max_queries:
        raise LensError(f"synthetic-limit: {n_docs} docs x {items_per_doc} items allow 1..{max_queries} queries, asked for {n_queries}")
    rng = random.Random(seed)
    people = rng.sample(names, n_docs)
    items = rng.sample(LIKEABLE_ITEMS, len(LIKEABLE_ITEMS))
    query_items, fillers = items[:n_queries], items[n_queries:]
    liked: list[list[str]] = [[] for _ in range(n_docs)]
    qrels: dict[str, dict[str, int]] = {}
    for qi, item in enumerate(query_items):
        open_docs = [d for d in range(n_docs) if len(liked[d]) < items_per_doc]
        pair = rng.sample(open_docs, 2)
        for d in pair:
            liked[d].append(item)
        qrels[f"q{qi}"] = {f"d{d}": 1 for d in pair}
    documents = []
    for d in range(n_docs):
        extra = rng.sample(fillers, items_per_doc - len(liked[d]))
        mine = liked[d] + extra
        rng.shuffle(mine)
        documents.append(Document(f"d{d}", f"{people[d]} likes {_join_items(mine)}."))
    queries = [Query(f"q{qi}", f"Who likes {item}?") for qi, item in enumerate(query_items)]
    return Dataset(f"synthetic-limit-{n_docs}x{items_per_doc}-s{seed}", documents, queries, qrels)


PAIR_ORDERS = ("random", "pairs")


def limit_pairs_dataset(n_docs: int = 46, core: int | None = None, n_queries: int | None = None,
                        items_per_doc: int | None = None, split: str = "eval", seed: int = 0,
                        order: str = "random") -> Dataset:
    """LIMIT's design (google-deepmind LIMIT, "LIMIT-small"): over ``core`` documents, every pair
    of documents shares exactly one item that no other document likes, so each core document
    carries core-1 items and every other core document is a hard negative; a query "Who likes X?"
    names the item of one pair (two relevant documents).  ``n_docs - core`` further documents
    (LIMIT's large corpus) like ``items_per_doc`` items (default core-1) drawn from the rest of
    the vocabulary, never a query's item.  Items and names come from one half of a vocabulary
    split in two (``split``: ``eval``, the default, or ``train``; lens.data.limit_words), so
    evaluation never sees a training item or name.  Queries: ``n_queries`` pairs drawn at random
    (default: all C(core, 2)), listed in a seeded random ``order`` so that the first K (what a sweep
    of K queries takes) are a uniform sample of the pairs; ``order="pairs"`` lists them in pair
    order, (0, 1), (0, 2), ..., whose first K all name the first few documents."""
    from lens.data.limit_words import SPLITS, limit_items, limit_names

    core = n_docs if core is None else core
    if split not in SPLITS:
        raise LensError(f"limit-pairs: split={split!r}; choose one of {', '.join(SPLITS)}")
    if order not in PAIR_ORDERS:
        raise LensError(f"limit-pairs: order={order!r}; choose one of {', '.join(PAIR_ORDERS)}")
    if not 2 <= core <= n_docs:
        raise LensError(f"limit-pairs: core must be 2..docs ({n_docs}), got {core}")
    vocab = list(limit_items(split))
    n_pairs = core * (core - 1) // 2
    items = core - 1 if items_per_doc is None else items_per_doc
    if not 1 <= items <= 200:
        raise LensError(f"limit-pairs: items per distractor must be 1..200, got {items}")
    if n_pairs + (items if n_docs > core else 0) > len(vocab):
        raise LensError(f"limit-pairs: core={core} needs {n_pairs} pair items (+{items} for distractors); the "
                        f"{split} vocabulary has {len(vocab)}: use core <= 64")
    n_queries = n_pairs if n_queries is None else n_queries
    if not 1 <= n_queries <= n_pairs:
        raise LensError(f"limit-pairs: core={core} gives 1..{n_pairs} queries (one per pair), asked for {n_queries}")
    names = list(limit_names(split))
    if n_docs > len(names):  # a middle initial makes more unique names for a large distractor pool
        names += [f"{n.split()[0]} {c}. {n.split()[1]}" for c in "ABCDEFGHJKLMNPRSTW" for n in limit_names(split)]
    if n_docs > len(names):
        raise LensError(f"limit-pairs: at most {len(names)} documents (unique names), asked for {n_docs}")
    rng = random.Random(f"limit-pairs:{split}:{seed}")
    people = rng.sample(names, n_docs)
    rng.shuffle(vocab)
    pair_items, fillers = vocab[:n_pairs], vocab[n_pairs:]
    pairs = [(a, b) for a in range(core) for b in range(a + 1, core)]
    liked: list[list[str]] = [[] for _ in range(n_docs)]
    for (a, b), item in zip(pairs, pair_items):
        liked[a].append(item)
        liked[b].append(item)
    for d in range(core, n_docs):
        liked[d] = rng.sample(fillers, items)
    documents = []
    for d in range(n_docs):
        rng.shuffle(liked[d])
        documents.append(Document(f"d{d}", f"{people[d]} likes {_join_items(liked[d])}."))
    asked = sorted(rng.sample(range(n_pairs), n_queries))
    if order == "random":
        random.Random(f"limit-pairs-order:{split}:{seed}").shuffle(asked)
    queries = [Query(f"q{p}", f"Who likes {pair_items[p]}?") for p in asked]
    qrels = {f"q{p}": {f"d{pairs[p][0]}": 1, f"d{pairs[p][1]}": 1} for p in asked}
    tag = (f"limit-pairs-{n_docs}" + (f"c{core}" if core != n_docs else "") + f"-{split}-s{seed}"
           + ("-pairorder" if order == "pairs" else ""))
    return Dataset(tag, documents, queries, qrels)


def needle_dataset(n_docs: int = 256, n_queries: int = 64, seed: int = 0) -> Dataset:
    """Key-value needles: "The secret word for <key> is <value>."; one relevant document per query."""
    keys = [f"{a} {n}" for a in KEY_ADJECTIVES for n in KEY_NOUNS]
    if n_docs > len(keys):
        raise LensError(f"needle: at most {len(keys)} documents (unique keys), asked for {n_docs}")
    if not 1 <= n_queries <= n_docs:
        raise LensError(f"needle: queries must be 1..{n_docs}, asked for {n_queries}")
    rng = random.Random(seed)
    doc_keys = rng.sample(keys, n_docs)
    values = [rng.choice(LIKEABLE_ITEMS) for _ in range(n_docs)]
    documents = [Document(f"d{i}", f"The secret word for {k} is {v}.") for i, (k, v) in enumerate(zip(doc_keys, values))]
    asked = rng.sample(range(n_docs), n_queries)
    queries = [Query(f"q{j}", f"What is the secret word for {doc_keys[d]}?") for j, d in enumerate(asked)]
    qrels = {f"q{j}": {f"d{d}": 1} for j, d in enumerate(asked)}
    return Dataset(f"needle-{n_docs}-s{seed}", documents, queries, qrels)


def _parse_options(spec: str, allowed: dict[str, type]) -> dict:
    name, _, rest = spec.partition(":")
    out = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            raise LensError(f"dataset {spec!r}: unknown option {item!r}; {name} takes {', '.join(f'{k}=' for k in allowed)}")
        try:
            out[key] = allowed[key](value)
        except ValueError:
            raise LensError(f"dataset {spec!r}: {key}={value!r} is not a {allowed[key].__name__}") from None
    return out


def load_dataset(spec: str, seed: int = 0, drop_unjudged: bool = False, split: str | None = None) -> Dataset:
    """``synthetic-limit[:docs=..,items=..,queries=..]``,
    ``limit-pairs[:docs=..,core=..,items=..,queries=..,split=eval|train,order=random|pairs]``, ``needle[:docs=..,queries=..]``
    or a BEIR folder (``split``: its qrels file, qrels/<split>.tsv, default test)."""
    if split is not None and not Path(spec).expanduser().is_dir():
        raise LensError(f"--split {split}: only a BEIR folder has qrels splits (limit-pairs takes split= in its spec)")
    if spec.split(":")[0] == "synthetic-limit":
        o = _parse_options(spec, {"docs": int, "items": int, "queries": int, "seed": int})
        return limit_dataset(o.get("docs", 256), o.get("items", 20), o.get("queries", 64), o.get("seed", seed))
    if spec.split(":")[0] == "limit-pairs":
        o = _parse_options(spec, {"docs": int, "core": int, "items": int, "queries": int, "split": str, "seed": int,
                                  "order": str})
        return limit_pairs_dataset(o.get("docs", 46), o.get("core"), o.get("queries"), o.get("items"),
                                   o.get("split", "eval"), o.get("seed", seed), o.get("order", "random"))
    if spec.split(":")[0] == "needle":
        o = _parse_options(spec, {"docs": int, "queries": int, "seed": int})
        return needle_dataset(o.get("docs", 256), o.get("queries", 64), o.get("seed", seed))
    if Path(spec).expanduser().is_dir():
        return load_beir(spec, split=split or "test", drop_unjudged=drop_unjudged)
    raise LensError(f"dataset {spec!r}: not a folder, 'synthetic-limit[:docs=N,items=K,queries=Q]', 'limit-pairs[:docs=N,core=C]' or 'needle[:docs=N]'")
