"""What a query run leaves behind: the record classes metrics, sweeps and the app read."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from kernels.corpus_attention import CorpusAttentionResult

CODE_DIGITS = 4


@dataclass
class DocumentKV:
    keys: Tensor  # [layer, kv_head, len, d_head], rotated
    values: Tensor  # [layer, kv_head, len, d_head]



@dataclass
class QueryRun:
    """One query over one corpus: decoded code and the per-layer record of the readout token."""

    query_id: str
    n_docs: int
    intervention: str
    corpus: list[int]  # pool indices, in corpus order
    gold_positions: list[int]  # indices into corpus
    codes: list[str]  # code of each corpus document
    decoded: str  # the four digits decoded (greedy, or the best of a beam over the corpus's codes)
    digit_logprobs: Tensor  # [4, 10] log-probs over the ten digits at each step of the decoded path
    readout_logits: Tensor  # [vocab] at the readout token (predicts the first digit)
    layers: list[CorpusAttentionResult] = field(default_factory=list)  # readout token only (Q=1)
    attn_out: Tensor | None = None  # [layer, d_model] attention block output at the readout token
    gold_attn_out: Tensor | None = None  # [layer, d_model] W_O applied to the gold part a^G
    resid_post: Tensor | None = None  # [layer, d_model] residual stream after each layer, readout token
    logit_lens: Tensor | None = None  # [layer, 10] digit logits of final norm + unembedding of resid_post
    # [layer, 6, N] routing scores per document: QK-MaxSim reduced over heads by max and by mean,
    # then mean key (q . mean K_doc), then chunk mean (the readout token's best q . mean K_chunk,
    # chunks of ROUTE_CHUNK keys), each by max and by mean (lens.metrics.ROUTERS x REDUCES)
    route_scores: Tensor | None = None
    routed: list[int] | None = None  # corpus positions kept by a route intervention (after its layer)
    ranked_codes: list[str] = field(default_factory=list)  # best first (one code when greedy)
    ranked_logprobs: list[float] = field(default_factory=list)  # log P(code) of each ranked code
    n_tokens: int = 0  # context length: instruction + documents + query block

    @property
    def gold_codes(self) -> list[str]:
        return [self.codes[p] for p in self.gold_positions]

    @property
    def correct(self) -> bool:
        return self.decoded in self.gold_codes

