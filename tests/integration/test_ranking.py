"""Hidden documents and the exclusion ranking: a hidden document is one the query does not see
(the same run as a corpus without it), the dense nnsight engine agrees, and each code the
exclusion ranking adds is the best the model decodes with the codes before it hidden."""

from dataclasses import replace

import pytest
import torch

from kernels.spec import parse_intervention
from lens.errors import LensError
from lens.models.backends import load_model
from lens.runtime import BlockSearchRunner
from lens.runtime.hf_runner import HFRunner
from lens.runtime.ranking import check_ranking, rank_by_exclusion
from tests.integration.test_nnsight_backend import _same_runs

SPECS = [None, "ssmax:s=0.6,n=docs", "ssmax:s=0.5,n=keys", "route:layer=1,B=3"]


@pytest.mark.parametrize("spec", SPECS)
def test_hiding_a_document_is_the_run_without_it(spec, models, small_limit):
    """Under shared positions every document and the query keep their places when one leaves, so
    hiding document j must give the numbers of the corpus with j taken out."""
    runner = BlockSearchRunner(models("tiny-llama"), small_limit, progress=False)
    fn = parse_intervention(spec) if spec else None
    full = runner.stream("q3", 9, fn)
    j = next(p for p in range(full.n_docs) if p not in full.gold_positions
             and len(runner.pool.doc_token_ids[full.corpus[p]]) < max(len(runner.pool.doc_token_ids[d]) for d in full.corpus))
    hidden = runner.run_streams([runner.stream("q3", 9, fn, hidden=(j,))], beam=3)[0]
    corpus = [d for p, d in enumerate(full.corpus) if p != j]
    without = replace(runner.stream("q3", 9, fn), corpus=corpus,
                      gold_positions=[p - (p > j) for p in full.gold_positions])
    absent = runner.run_streams([without], beam=3)[0]
    assert hidden.ranked_codes == absent.ranked_codes
    assert torch.allclose(hidden.readout_logits, absent.readout_logits, atol=1e-4)  # the runs sum in two parts
    keep = [p for p in range(full.n_docs) if p != j]
    for a, b in zip(hidden.layers, absent.layers):
        assert torch.isinf(a.doc_lse[..., j]).all() and a.doc_lse[..., j].lt(0).all()
        assert torch.allclose(a.doc_lse[..., keep], b.doc_lse, atol=1e-5)
        assert torch.allclose(a.lse, b.lse, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS)
def test_hidden_documents_equal_the_dense_engine(spec, models, small_limit):
    fn = parse_intervention(spec) if spec else None
    ours_runner = BlockSearchRunner(models("tiny-llama"), small_limit, progress=False)
    theirs_runner = HFRunner(load_model("tiny-llama", backend="nnsight"), small_limit, progress=False)
    ours = ours_runner.run_streams([ours_runner.stream("q3", 7, fn, hidden=(1, 4))], beam=2)[0]
    theirs = theirs_runner.run_streams([theirs_runner.stream("q3", 7, fn, hidden=(1, 4))], beam=2)[0]
    _same_runs(ours, theirs, 2e-5)
    hidden_codes = {ours.codes[1], ours.codes[4]}
    assert not hidden_codes & set(ours.ranked_codes)


def test_exclusion_ranks_each_next_code_with_the_ones_before_it_hidden(models, small_limit):
    runner = BlockSearchRunner(models("tiny-llama"), small_limit, progress=False)
    fn = parse_intervention("route:layer=1,B=5")
    streams = [runner.stream(q, 10, f) for q in ("q0", "q2") for f in (None, fn)]
    beam_runs = runner.run_streams([runner.stream(s.query_id, 10, s.intervention) for s in streams], beam=2)
    runs = rank_by_exclusion(runner, streams, runner.run_streams(streams, beam=2), k=3, beam=2)
    for s, run, plain in zip(streams, runs, beam_runs):
        assert len(set(run.ranked_codes)) == 3 and run.ranked_codes[0] == plain.ranked_codes[0]
        assert torch.equal(run.readout_logits, plain.readout_logits)  # the record is the first pass's
        where = {c: p for p, c in enumerate(run.codes)}
        for depth in (1, 2):
            hidden = tuple(where[c] for c in run.ranked_codes[:depth])
            again = runner.run_streams([runner.stream(s.query_id, 10, s.intervention, hidden=hidden)], beam=2)[0]
            assert again.ranked_codes[0] == run.ranked_codes[depth]
            assert again.ranked_logprobs[0] == pytest.approx(run.ranked_logprobs[depth], rel=1e-6)  # alone vs beside others


def test_hidden_positions_are_checked(models, small_limit):
    runner = BlockSearchRunner(models("tiny-llama"), small_limit, progress=False)
    for bad in [(9,), (-1,), tuple(range(4))]:
        with pytest.raises(LensError, match="give corpus positions 0..3, leaving one or more seen"):
            runner.stream("q0", 4, hidden=bad)


def test_ranking_is_checked():
    assert check_ranking("beam", 1) is None and check_ranking(None, 2) is None
    assert check_ranking("exclude", 2) == "exclude"
    with pytest.raises(LensError, match="--beam 2 or more"):
        check_ranking("exclude", 1)
    with pytest.raises(LensError, match="choose one of beam, exclude"):
        check_ranking("diverse", 2)


def test_streams_hiding_different_documents_together_equal_each_alone(models, small_limit):
    """Streams that hide different documents share the runs of keys between them: each gets
    what it gets alone, and a stream hiding nothing beside them is unchanged."""
    runner = BlockSearchRunner(models("tiny-qwen3"), small_limit, progress=False)
    hides = [(0,), (2, 3), (5,), ()]
    together = runner.run_streams([runner.stream("q1", 8, None, hidden=h) for h in hides], beam=2)
    for h, run in zip(hides, together):
        alone = runner.run_streams([runner.stream("q1", 8, None, hidden=h)], beam=2)[0]
        assert run.ranked_codes == alone.ranked_codes
        assert torch.allclose(run.readout_logits, alone.readout_logits, atol=1e-4)  # runs of keys cut differently
        for a, b in zip(run.layers, alone.layers):
            assert torch.allclose(a.doc_lse, b.doc_lse, atol=1e-5) and torch.allclose(a.output, b.output, atol=1e-5)
