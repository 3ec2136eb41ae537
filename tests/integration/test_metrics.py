"""Metrics: hand-computed values on tiny corpora, and agreement with a dense computation from
the hooked model's attention patterns (the T x T path) at small N."""

import math

import pandas as pd
import pytest
import torch

from kernels.corpus_attention import CorpusAttentionResult
from kernels.spec import parse_intervention
from lens.data.layout import dense_layout
from lens.runtime import BlockSearchRunner, QueryRun
from lens.metrics import (
    head_rows, hit_at_k, layer_rows, predicted_gold_mass, query_row, read_records, recall_at_k,
    ssmax_predicted_gold_mass,
)


def test_recall_and_hit_by_hand():
    assert recall_at_k(["1111", "2222", "3333"], ["2222", "9999"], 1) == 0.0
    assert recall_at_k(["1111", "2222", "3333"], ["2222", "9999"], 2) == 0.5
    assert recall_at_k(["9999", "2222"], ["2222", "9999"], 2) == 1.0
    assert hit_at_k(["1111", "2222"], ["2222", "9999"], 2) and not hit_at_k(["1111", "2222"], ["2222"], 1)


def test_theory_by_hand():
    assert predicted_gold_mass(0.0, 5) == pytest.approx(1 / 5)
    assert predicted_gold_mass(math.log(9), 10) == pytest.approx(0.5)
    assert predicted_gold_mass(3.0, 1) == 1.0
    # SSMax: N^(-s Delta) with s Delta = 1 -> 1 / (1 + (N-1)/N)
    assert ssmax_predicted_gold_mass(2.0, 100, 0.5) == pytest.approx(1 / (1 + 99 / 100))


def _toy_run():
    """Two heads, three documents (gold = document 1), one layer, hand-set statistics."""
    doc_max = torch.tensor([[[1.0, 3.0, 2.0]], [[4.0, 0.0, 1.0]]])  # [head, 1, N]
    mass = torch.tensor([[[0.2, 0.5, 0.1]], [[0.6, 0.1, 0.1]]])
    lse = torch.zeros(2, 1)  # so doc_lse = log(mass)
    res = CorpusAttentionResult(torch.zeros(1, 2, 4), lse, doc_max, torch.log(mass))
    return QueryRun(
        query_id="q", n_docs=3, intervention="none", corpus=[7, 8, 9], gold_positions=[1],
        codes=["1234", "5678", "9012"], decoded="5678", digit_logprobs=torch.zeros(4, 10),
        readout_logits=torch.zeros(10), layers=[res],
        attn_out=torch.tensor([[3.0, 4.0]]), gold_attn_out=torch.tensor([[0.0, 2.0]]),
        logit_lens=torch.tensor([[0.0, 0, 0, 0, 0, 9, 0, 0, 0, 0]]),
        # QK-MaxSim by head max and head mean, then mean key by head max and head mean
        route_scores=torch.tensor([[[4.0, 3.0, 2.0], [2.5, 1.5, 1.5], [0.5, 2.0, 1.0], [1.0, 0.0, 0.5]]]),
        ranked_codes=["5678", "1234"], n_tokens=50,
    )


def test_metrics_by_hand():
    run = _toy_run()
    heads = head_rows(run)
    assert [r["gold_maxsim"] for r in heads] == [3.0, 0.0]
    assert [r["gold_rank"] for r in heads] == [1, 3]
    assert heads[0]["delta"] == pytest.approx(3.0 - 1.5) and heads[1]["delta"] == pytest.approx(0.0 - 2.5)
    assert heads[0]["gold_mass"] == pytest.approx(0.5) and heads[1]["gold_mass"] == pytest.approx(0.1)
    assert heads[0]["pred_mass_maxsim"] == pytest.approx(1 / (1 + 2 * math.exp(-1.5)))
    (layer,) = layer_rows(run)
    assert layer["r_sum_hit"] is False  # summed mass: doc0 0.8, doc1 0.6
    assert layer["r_any_hit"] is True  # head 0 ranks the gold first
    assert layer["mass_recall_at_2"] == 1.0  # by summed mass doc0 0.8, doc1 0.6, doc2 0.2: the gold is second
    assert "mass_recall_at_5" not in layer  # deeper than the three documents
    assert layer["gold_share"] == pytest.approx(2.0 / 5.0)
    assert layer["first_digit_hit"] is True  # logit lens argmax 5 == gold code's first digit
    assert layer["routing_hit_maxsim_max_at_1"] is False and layer["routing_hit_maxsim_max_at_2"] is True
    assert layer["routing_hit_maxsim_mean_at_1"] is False and layer["routing_hit_maxsim_mean_at_2"] is True
    assert layer["routing_hit_meankey_max_at_1"] is True  # the gold scores 2.0, the others 0.5 and 1.0
    assert layer["routing_hit_meankey_mean_at_2"] is False  # the gold scores lowest by head mean
    assert not any("@" in c for c in layer)
    q = query_row(run)
    assert q["recall_at_1"] == 1.0 and q["hit_at_2"] and "recall_at_5" not in q
    assert q["gold_codes"] == ["5678"] and q["ranked_codes"] == ["5678", "1234"]


def test_records_of_the_first_format_read_as_today(tmp_path):
    """A records file an older lens wrote ("|"-joined codes, "@" in column names) reads with
    today's names and list columns; today's files read unchanged."""
    old = pd.DataFrame(dict(level=["query", "layer"], gold_codes=["5678|1234", None], ranked_codes=["5678|9012", None],
                            **{"recall@2": [0.5, None], "hit@1": [True, None], "routing_hit_max@8": [None, True]}))
    old.to_parquet(tmp_path / "old.parquet")
    new = read_records(tmp_path / "old.parquet")
    assert list(new.columns) == ["level", "gold_codes", "ranked_codes", "recall_at_2", "hit_at_1", "routing_hit_maxsim_max_at_8"]
    assert list(new.gold_codes[0]) == ["5678", "1234"] and list(new.ranked_codes[0]) == ["5678", "9012"]
    assert read_records(tmp_path / "old.parquet", columns=["level", "recall_at_2"]).recall_at_2[0] == 0.5
    query_row_frame = pd.DataFrame([query_row(_toy_run())])
    query_row_frame.to_parquet(tmp_path / "new.parquet")
    again = read_records(tmp_path / "new.parquet")
    assert list(again.ranked_codes[0]) == ["5678", "1234"] and "recall_at_1" in again.columns


@pytest.mark.parametrize("spec", ["none", "ssmax:s=0.5,n=docs", "sink:b=1+temperature:t=0.8", "adaptive:h=0.5",
                                  "temperature:t=2+adaptive:h=1,layers=1|2"])
def test_metrics_equal_a_dense_computation_from_hook_patterns(models, small_limit, spec):
    """R_sum, R_any, gold mass, gold MaxSim and GoldShare from the kernels' statistics equal the
    same quantities computed from the dense model's hook_pattern / hook_attn_scores / hook_v."""
    model = models("tiny-llama")
    runner = BlockSearchRunner(model, small_limit, progress=False)
    fn = parse_intervention(spec).score  # the score function (the dense model takes it directly)
    run = runner.run_query("q2", 7, intervention=fn)
    query_ids = runner.pool.query_token_ids(model.tokenizer, "q2")
    layout = dense_layout(runner.pool, run.corpus, query_ids)
    readout = layout.query_slice.stop - 1
    # the lens applies interventions on the query side: apply them on query rows here too
    _, cache = model.run_with_cache(
        layout.tokens[None], attention_mask=layout.mask[None, None], position_ids=layout.positions[None],
        score_fn=None, names_filter=lambda n: n.endswith(("hook_pattern", "hook_attn_scores", "hook_v")),
    ) if spec == "none" else _dense_with_query_side_intervention(model, layout, fn)
    heads, layers = head_rows(run), layer_rows(run)
    n_rep = model.cfg.n_heads // model.cfg.n_kv_heads
    gold = torch.isin(layout.key_doc, torch.tensor(run.gold_positions))
    for layer in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, readout]  # [head, T]
        scores = cache[f"blocks.{layer}.attn.hook_attn_scores"][0, :, readout]
        doc_mass = torch.stack([pattern[:, layout.key_doc == j].sum(-1) for j in range(7)], -1)
        doc_max = torch.stack([scores[:, layout.key_doc == j].amax(-1) for j in range(7)], -1)
        rows = heads[layer * model.cfg.n_heads : (layer + 1) * model.cfg.n_heads]
        assert torch.allclose(torch.tensor([r["gold_mass"] for r in rows]), pattern[:, gold].sum(-1), atol=1e-5)
        assert torch.allclose(torch.tensor([r["gold_maxsim"] for r in rows]), doc_max[:, run.gold_positions].amax(-1), atol=1e-4)
        assert layers[layer]["r_sum_hit"] == (int(doc_mass.sum(0).argmax()) in run.gold_positions)
        top = doc_mass.sum(0).topk(5).indices.tolist()
        assert layers[layer]["mass_recall_at_5"] == len(set(top) & set(run.gold_positions)) / len(run.gold_positions)
        assert layers[layer]["r_any_hit"] == any(int(doc_max[h].argmax()) in run.gold_positions for h in range(doc_max.shape[0]))
        v = cache[f"blocks.{layer}.attn.hook_v"][0].repeat_interleave(n_rep, dim=1)  # [T, head, d]
        a = torch.einsum("ht,thd->hd", pattern, v).reshape(-1)
        a_gold = torch.einsum("ht,thd->hd", pattern * gold, v).reshape(-1)
        o_proj = model.blocks[layer].attn.o_proj
        share = (o_proj(a_gold).norm() / o_proj(a).norm()).item()
        assert layers[layer]["gold_share"] == pytest.approx(share, abs=1e-4)


def _dense_with_query_side_intervention(model, layout, fn):
    """Dense run where the score function applies to the query rows only (as in the engine)."""
    rows = torch.zeros(layout.tokens.shape[0], dtype=torch.bool)
    rows[layout.query_slice] = True

    class Wrapped:
        def __call__(self, scores, ctx):
            return torch.where(rows[:, None], fn(scores, ctx), scores)

        def sink_logit(self, ctx):
            sink = fn.sink_logit(ctx)
            if sink is None:
                return None
            # the sink only joins the query rows' denominators
            return torch.where(rows.view(1, -1, 1), sink, torch.tensor(float("-inf")))

    return model.run_with_cache(
        layout.tokens[None], attention_mask=layout.mask[None, None], position_ids=layout.positions[None],
        score_fn=Wrapped(), key_doc=layout.key_doc,
        names_filter=lambda n: n.endswith(("hook_pattern", "hook_attn_scores", "hook_v")),
    )
