"""The shipped BlockSearch-135M adapter: loads offline and retrieves on a small fixed corpus."""

import pytest
import torch

from lens.data.datasets import limit_dataset, needle_dataset
from lens.data.layout import LayoutConfig
from lens.runtime import BlockSearchRunner
from lens.models.registry import ADAPTERS, load_model

pytestmark = pytest.mark.skipif(
    not (ADAPTERS / "blocksearch-135m" / "adapter.safetensors").is_file(),
    reason="no blocksearch-135m adapter shipped yet (make train)",
)


def test_adapter_is_small_and_decodes_gold_codes():
    path = ADAPTERS / "blocksearch-135m" / "adapter.safetensors"
    assert path.stat().st_size <= 20 * 1024 * 1024
    model = load_model("blocksearch-135m", dtype=torch.bfloat16)
    base = load_model("smollm2-135m", dtype=torch.bfloat16)
    assert model.layout_defaults == {"code_position": "end", "max_doc_tokens": 512}
    assert not torch.equal(model.blocks[10].attn.q_proj.weight, base.blocks[10].attn.q_proj.weight)
    layout = LayoutConfig.for_model(model)
    hits = {}
    for name, data in (("limit", limit_dataset(n_docs=64, items_per_doc=20, n_queries=8, seed=11)),
                       ("needle", needle_dataset(n_docs=64, n_queries=8, seed=11))):  # evaluation seeds
        for label, lm in (("trained", model), ("base", base)):
            runner = BlockSearchRunner(lm, data, layout, progress=False)
            runs = runner.run_streams([runner.stream(q.id, 16, record=False) for q in data.queries], beam=2)
            hits[name, label] = sum(r.correct for r in runs)
    # the trained adapter retrieves on both generators; the base model is near chance
    assert hits["limit", "trained"] >= 4 and hits["needle", "trained"] >= 6, hits
    assert hits["limit", "trained"] > hits["limit", "base"] + 2 and hits["needle", "trained"] > hits["needle", "base"] + 2, hits
