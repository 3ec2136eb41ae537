"""Every shipped adapter loads offline (no hub) and retrieves on a small fixed corpus."""

import pytest
import torch

from lens.data.datasets import load_dataset
from lens.runtime import BlockSearchRunner
from lens.models.registry import adapter_names, load_model

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", adapter_names())
def test_adapter_decodes_the_gold_code(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_model(name, dtype=torch.float32)
    data = load_dataset("needle:docs=8,queries=8,seed=0")
    runner = BlockSearchRunner(model, data, progress=False)
    runs = runner.run_streams([runner.stream(q.id, 8, record=False) for q in data.queries])
    assert sum(run.correct for run in runs) >= 7, [(run.decoded, run.gold_codes) for run in runs]


def test_trained_length_aware_softmax_is_part_of_the_model():
    if "blocksearch-135m-ssmax" not in adapter_names():
        pytest.skip("blocksearch-135m-ssmax is not shipped in lens/adapters")
    model = load_model("blocksearch-135m-ssmax", dtype=torch.float32)
    fn = model.builtin_score_fn
    assert fn.n == "docs" and len(fn.s) == model.cfg.n_layers
    assert all(0 < s < 2 for s in fn.s)
