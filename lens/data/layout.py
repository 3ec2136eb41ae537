"""The BlockSearch layout: instruction block, one block per document with a fixed four-digit
code, and a query block after which the model decodes the gold document's code.

Position schemes (``LayoutConfig.positions``):

* ``shared`` (BlockRank): every document starts right after the instruction; the query block
  starts at the fixed far offset ``query_offset``.
* ``restart`` (MSA): every document's positions restart at 0; the query starts at
  ``query_offset``.
* ``sequential``: plain concatenation; the query follows the last document.  A document's KV
  then depends on where it sits, so its cache key includes its start position.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass

import torch

from kernels.masks import and_masks, causal, create_mask, or_masks, same_segment
from lens.data.datasets import Dataset, Document
from lens.errors import LensError

POSITION_SCHEMES = ("shared", "restart", "sequential")
N_CODES = 10_000  # four digits: 0000-9999


CODE_POSITIONS = ("start", "end")
INSTRUCTION = (
    "Each document below {where} with a unique four-digit code in brackets. "
    "After the query, answer with the code of the document that answers it.\n\n"
)
DOCUMENT_TEMPLATES = {"start": "[{code}] {title}{text}\n", "end": "{title}{text} [{code}]\n"}


@dataclass(frozen=True)
class LayoutConfig:
    """How a corpus is laid out in the context.

    ``code_position``: ``start`` is the paper's ``[4821] <text>``; ``end`` puts the code after
    the text, where (causally) it can see the document it names, the format blocksearch-135m is
    trained on (a 135M model did not learn code-first retrieval in the CPU budget; README).
    ``instruction`` and ``document_template`` default to the code position's."""

    positions: str = "shared"
    query_offset: int = 4096
    max_doc_tokens: int = 256
    truncate: bool = False  # cut documents longer than max_doc_tokens (counted) instead of failing
    code_position: str = "start"
    instruction: str | None = None
    document_template: str | None = None
    query_template: str = "\nQuery: {query}\nCode: ["
    code_seed: int = 0  # codes are fixed per document of a pool, drawn with this seed

    def __post_init__(self):
        if self.positions not in POSITION_SCHEMES:
            raise LensError(f"positions {self.positions!r}: choose one of {', '.join(POSITION_SCHEMES)}")
        if self.code_position not in CODE_POSITIONS:
            raise LensError(f"code_position {self.code_position!r}: choose one of {', '.join(CODE_POSITIONS)}")
        if self.max_doc_tokens < 1:
            raise LensError(f"max_doc_tokens must be >= 1, got {self.max_doc_tokens}")
        if self.instruction is None:
            where = "starts" if self.code_position == "start" else "ends"
            object.__setattr__(self, "instruction", INSTRUCTION.format(where=where))
        if self.document_template is None:
            object.__setattr__(self, "document_template", DOCUMENT_TEMPLATES[self.code_position])

    @classmethod
    def for_model(cls, model, **fields) -> "LayoutConfig":
        """The layout a model was trained on (``model.layout_defaults``), with ``fields`` on top
        (a field given as None keeps the model's default)."""
        defaults = dict(getattr(model, "layout_defaults", None) or {})
        defaults.update({k: v for k, v in fields.items() if v is not None})
        return cls(**defaults)

    def document_fingerprint(self) -> str:
        """What a document's KV depends on (the query side is left out on purpose)."""
        fields = asdict(self)
        for name in ("query_offset", "query_template"):
            fields.pop(name)
        return hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:16]


def assign_codes(n_docs: int, seed: int) -> list[str]:
    if n_docs > N_CODES:
        raise LensError(
            f"a pool of {n_docs} documents cannot carry unique four-digit codes (at most {N_CODES}); "
            "use a smaller pool (e.g. synthetic-limit:docs=10000)"
        )
    return [f"{c:04d}" for c in random.Random(seed).sample(range(N_CODES), n_docs)]


@dataclass
class PoolLayout:
    """A dataset's documents tokenized once in the layout, with their fixed codes."""

    dataset: Dataset
    config: LayoutConfig
    instruction_ids: list[int]
    doc_token_ids: list[list[int]]
    codes: list[str]
    truncated: int  # documents cut to max_doc_tokens (only with config.truncate)

    def query_token_ids(self, tokenizer, query_id: str) -> list[int]:
        text = next(q.text for q in self.dataset.queries if q.id == query_id)
        return tokenizer(self.config.query_template.format(query=text), add_special_tokens=False).input_ids

    def code_of(self, doc_index: int) -> str:
        return self.codes[doc_index]


def build_pool_layout(dataset: Dataset, tokenizer, config: LayoutConfig) -> PoolLayout:
    codes = assign_codes(len(dataset.documents), config.code_seed)

    def render(d: Document, code: str, text: str) -> str:
        return config.document_template.format(code=code, title=f"{d.title}: " if d.title else "", text=text)

    texts = [render(d, code, d.text) for d, code in zip(dataset.documents, codes)]
    ids = tokenizer(texts, add_special_tokens=False).input_ids
    truncated = 0
    for i, doc in enumerate(ids):
        if len(doc) > config.max_doc_tokens:
            d = dataset.documents[i]
            if not config.truncate:
                raise LensError(
                    f"{dataset.name}: document {d.id!r} has {len(doc)} tokens, more than "
                    f"max_doc_tokens={config.max_doc_tokens}; raise --max-doc-tokens or pass --truncate"
                )
            ids[i] = _truncate_text(tokenizer, d, codes[i], config, render)
            truncated += 1
    instruction = tokenizer(config.instruction, add_special_tokens=False).input_ids
    return PoolLayout(dataset, config, instruction, ids, codes, truncated)


def _truncate_text(tokenizer, doc: Document, code: str, config: LayoutConfig, render) -> list[int]:
    """The document cut to max_doc_tokens by shortening its text, never its code or title."""
    text_ids = tokenizer(doc.text, add_special_tokens=False).input_ids
    overhead = len(tokenizer(render(doc, code, ""), add_special_tokens=False).input_ids)
    keep = config.max_doc_tokens - overhead
    while keep > 0:
        ids = tokenizer(render(doc, code, tokenizer.decode(text_ids[:keep])), add_special_tokens=False).input_ids
        if len(ids) <= config.max_doc_tokens:
            return ids
        keep -= max(1, len(ids) - config.max_doc_tokens)
    raise LensError(f"document {doc.id!r}: its code and title alone take {overhead} tokens, more than "
                    f"max_doc_tokens={config.max_doc_tokens}; raise --max-doc-tokens")


def pool_order(n_docs: int, seed: int) -> list[int]:
    """The seeded permutation of the pool that every query's distractors are drawn from, in order."""
    order = list(range(n_docs))
    random.Random(seed).shuffle(order)
    return order


def corpus_for_query(dataset: Dataset, query_id: str, n_docs: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """The query's corpus at size N: its gold document(s) plus the first N-g distractors of one
    seeded permutation of the pool, so corpora are nested across N.  Gold documents sit at
    seeded positions.  Returns (pool indices in corpus order, positions of the gold documents)."""
    if query_id not in dataset.qrels:
        raise LensError(f"{dataset.name}: query {query_id!r} has no relevance judgements")
    gold = dataset.gold(query_id)
    pool = len(dataset.documents)
    if n_docs > pool:
        raise LensError(f"N={n_docs} is larger than the pool of {pool} documents in {dataset.name}; use N <= {pool}")
    if n_docs < len(gold):
        raise LensError(f"N={n_docs} cannot hold the {len(gold)} gold documents of query {query_id!r}")
    order = pool_order(pool, seed)
    gold_set = set(gold)
    corpus = [d for d in order if d not in gold_set][: n_docs - len(gold)]
    rng = random.Random(f"{seed}:{query_id}")
    for g in gold:
        corpus.insert(rng.randint(0, len(corpus)), g)
    gold_positions = sorted(corpus.index(g) for g in gold)
    return corpus, gold_positions


def document_start(config: LayoutConfig, instruction_len: int, offset_in_corpus: int) -> int:
    """Position of a document's first token; ``offset_in_corpus`` counts the tokens of the
    documents before it (used by ``sequential`` only)."""
    if config.positions == "shared":
        return instruction_len
    if config.positions == "restart":
        return 0
    return instruction_len + offset_in_corpus


def query_start(config: LayoutConfig, instruction_len: int, corpus_tokens: int, longest_doc: int) -> int:
    if config.positions == "sequential":
        return instruction_len + corpus_tokens
    first_free = longest_doc + (instruction_len if config.positions == "shared" else 0)
    if config.query_offset < max(first_free, instruction_len):
        raise LensError(
            f"query_offset={config.query_offset} overlaps document positions (they reach {first_free}); raise it"
        )
    return config.query_offset


@dataclass
class DenseLayout:
    """One query's whole layout as a single sequence, for dense reference runs at small N."""

    tokens: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    mask: torch.Tensor  # [T, T] bool, True = may attend
    key_doc: torch.Tensor  # [T] document index in the corpus, -1 for instruction and query tokens
    query_slice: slice  # the query block's tokens


def dense_layout(pool: PoolLayout, corpus: list[int], query_ids: list[int]) -> DenseLayout:
    cfg, inst = pool.config, pool.instruction_ids
    tokens, positions, key_doc = list(inst), list(range(len(inst))), [-1] * len(inst)
    offset = 0
    for j, d in enumerate(corpus):
        doc = pool.doc_token_ids[d]
        start = document_start(cfg, len(inst), offset)
        tokens += doc
        positions += range(start, start + len(doc))
        key_doc += [j] * len(doc)
        offset += len(doc)
    longest = max(len(pool.doc_token_ids[d]) for d in corpus)
    q0 = query_start(cfg, len(inst), offset, longest)
    q_begin = len(tokens)
    tokens += query_ids
    positions += range(q0, q0 + len(query_ids))
    key_doc += [-1] * len(query_ids)
    t = len(tokens)
    # causal, and: the instruction for everyone, a document's own tokens, everything for the query
    segment = torch.tensor(key_doc[:q_begin] + [-2] * (t - q_begin))
    instruction = lambda q_idx, kv_idx: segment[kv_idx] == -1  # noqa: E731
    query = lambda q_idx, kv_idx: segment[q_idx] == -2  # noqa: E731
    mask = create_mask(and_masks(causal, or_masks(instruction, same_segment(segment), query)), t, t)
    return DenseLayout(
        torch.tensor(tokens), torch.tensor(positions), mask, torch.tensor(key_doc), slice(q_begin, t)
    )
