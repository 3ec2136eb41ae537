"""The shipped BlockSearch-135M adapter: loads offline and retrieves on a small fixed corpus."""

import pytest
import torch

from lens.data.datasets import limit_dataset
from lens.engine import BlockSearchRunner
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
    assert not torch.equal(model.blocks[10].attn.q_proj.weight, base.blocks[10].attn.q_proj.weight)
    data = limit_dataset(n_docs=64, items_per_doc=20, n_queries=8, seed=11)  # evaluation seed, not a training one
    runner = BlockSearchRunner(model, data, progress=False)
    runs = runner.run_streams([runner.stream(q.id, 16) for q in data.queries], beam=2)
    hits = sum(r.correct for r in runs)
    assert hits >= 6, [(r.decoded, r.gold_codes) for r in runs]
