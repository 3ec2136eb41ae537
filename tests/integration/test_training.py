"""The training pass is the inference pass with teacher forcing: same logits, batched passes
equal single ones, gradients reach the adapters through the document prefill."""

import torch

from lens.data.datasets import limit_dataset
from lens.runtime import BlockSearchRunner
from lens.models.lora import add_lora, merge_lora
from lens.training import layout_digit_logits


def _setup(models):
    model = models("tiny-llama")
    data = limit_dataset(n_docs=12, items_per_doc=5, n_queries=3, seed=3)
    runner = BlockSearchRunner(model, data, progress=False)
    return model, data, runner


def test_teacher_forced_digits_equal_the_engine(models):
    model, data, runner = _setup(models)
    pool = runner.pool
    for q in data.queries[:2]:
        run = runner.run_query(q.id, 8, record=False)
        docs = [pool.doc_token_ids[d] for d in run.corpus]
        other = data.queries[2].id  # a second, differently long query in the same batch
        passes = [(pool.query_token_ids(model.tokenizer, q.id), [int(c) for c in run.decoded]),
                  (pool.query_token_ids(model.tokenizer, other) + [13, 13], [1, 2, 3, 4])]
        out = layout_digit_logits(model, pool.instruction_ids, docs, passes, runner.digit_ids,
                                  query_offset=runner.layout.query_offset)
        assert torch.allclose(torch.log_softmax(out[0][0], -1), run.digit_logprobs, atol=1e-4)
        alone = layout_digit_logits(model, pool.instruction_ids, docs, passes[1:], runner.digit_ids,
                                    query_offset=runner.layout.query_offset)
        assert torch.allclose(alone[0][0], out[1][0], atol=1e-5)


def test_gradients_reach_the_document_side_and_merge_matches(models, tmp_path):
    import json

    from safetensors.torch import save_file

    from lens.models.registry import load_model
    from lens.models.lora import lora_state

    model = load_model("tiny-llama", dtype=torch.float32)
    data = limit_dataset(n_docs=6, items_per_doc=4, n_queries=2, seed=5)
    tok = model.tokenizer
    docs = tok([f"[{1000 + i}] {d.text}\n" for i, d in enumerate(data.documents)], add_special_tokens=False).input_ids
    digit_ids = torch.tensor([tok.convert_tokens_to_ids(str(d)) for d in range(10)])
    instruction = tok("Find it:", add_special_tokens=False).input_ids
    passes = [(tok("\nQuery: x\nCode: [", add_special_tokens=False).input_ids, [1, 0, 0, 2])]
    add_lora(model, 4, 8)
    named = {n: p for n, p in model.named_parameters() if "lora_" in n}
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in named.items():
            if "lora_B" in n:  # peft starts B at zero; make the adapter do something
                p.normal_(std=0.05)
    with torch.enable_grad():
        logits, log_mass = layout_digit_logits(model, instruction, docs, passes, digit_ids, mass_layer=1)[0]
        assert log_mass.shape == (model.cfg.n_heads, len(docs))
        mass = log_mass.exp().sum(-1)  # documents only: the instruction and the query keep the rest
        assert ((mass > 0) & (mass <= 1 + 1e-6)).all()
        torch.nn.functional.cross_entropy(logits, torch.tensor(passes[0][1])).backward()
    # layer 0's key/value adapters act on the query's own keys and on the documents' keys
    for name in ("blocks.0.attn.k_proj.lora_A.default.weight", "blocks.0.attn.v_proj.lora_A.default.weight"):
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name

    # the shipping path: merged weights give the same logits as the live adapter
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file(lora_state(model), folder / "adapter.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(dict(r=4, lora_alpha=8)))
    merged = load_model("tiny-llama", dtype=torch.float32)
    merge_lora(merged, folder)
    again = layout_digit_logits(merged, instruction, docs, passes, digit_ids)[0][0]
    assert torch.allclose(again, logits.detach(), atol=1e-4)


def test_aux_mass_is_differentiable(models):
    """The BlockRank auxiliary loss backpropagates through the per-document statistics."""
    from lens.models.registry import load_model

    model = load_model("tiny-llama", dtype=torch.float32)
    tok = model.tokenizer
    docs = tok([f"[{1000 + i}] word {i}\n" for i in range(5)], add_special_tokens=False).input_ids
    digit_ids = torch.tensor([tok.convert_tokens_to_ids(str(d)) for d in range(10)])
    params = add_lora(model, 4, 8)
    with torch.enable_grad():
        _, log_mass = layout_digit_logits(model, tok("Find:", add_special_tokens=False).input_ids, docs,
                                          [(tok("\nQuery: word 3\nCode: [", add_special_tokens=False).input_ids,
                                            [1, 0, 0, 3])], digit_ids, mass_layer=1)[0]
        (-log_mass[:, 3].mean()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_learned_ssmax_and_checkpointed_prefill_equal_the_engine_under_the_model_own_ssmax(models):
    """Training with a learned s_L (and the checkpointed prefill) gives the engine's digits when
    the model carries the same s_L as its own score function, and s_L gets a gradient."""
    from lens.training import LearnedSSMax

    model, data, runner = _setup(models)
    pool = runner.pool
    ssmax = LearnedSSMax(model.cfg.n_layers, init_n=4.0)
    with torch.no_grad():
        ssmax.s.copy_(torch.tensor([0.5, 0.9, 0.7]))
    q = data.queries[0]
    model.builtin_score_fn = ssmax.score_function()
    try:
        run = runner.run_query(q.id, 8, record=False)
    finally:
        del model.builtin_score_fn
    plain = runner.run_query(q.id, 8, record=False)
    assert not torch.allclose(run.digit_logprobs, plain.digit_logprobs, atol=1e-3)  # the scale changes the run
    docs = [pool.doc_token_ids[d] for d in run.corpus]
    passes = [(pool.query_token_ids(model.tokenizer, q.id), [int(c) for c in run.decoded])]
    with torch.enable_grad():
        out = layout_digit_logits(model, pool.instruction_ids, docs, passes, runner.digit_ids,
                                  query_offset=runner.layout.query_offset, ssmax=ssmax, checkpoint=True)
        assert torch.allclose(torch.log_softmax(out[0][0], -1), run.digit_logprobs, atol=1e-4)
        torch.log_softmax(out[0][0], -1)[0, 3].backward()
    assert ssmax.s.grad is not None and ssmax.s.grad.abs().sum() > 0


def test_a_corpus_prefilled_without_gradient_serves_the_s_l_training(models):
    """A frozen adapter's corpus, prefilled once under no_grad (how --freeze-lora trains the s_L
    alone), gives the same digits and the same s_L gradient as the prefill inside the pass, and
    no gradient reaches the documents' side."""
    from lens.training import LearnedSSMax, prefill_training_corpus

    model, data, runner = _setup(models)
    pool = runner.pool
    params = add_lora(model, 4, 8)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.05)
            p.requires_grad_(False)
    q = data.queries[0]
    run = runner.run_query(q.id, 8, record=False)
    docs = [pool.doc_token_ids[d] for d in run.corpus]
    passes = [(pool.query_token_ids(model.tokenizer, q.id), [int(c) for c in run.decoded])]
    grads, logits = [], []
    with torch.no_grad():
        prefilled = prefill_training_corpus(model, pool.instruction_ids, docs)
    assert not any(k.requires_grad for k in prefilled.keys + prefilled.values)
    for given in (None, prefilled):
        ssmax = LearnedSSMax(model.cfg.n_layers, init_n=4.0)
        with torch.enable_grad():
            out = layout_digit_logits(model, pool.instruction_ids, docs, passes, runner.digit_ids,
                                      query_offset=runner.layout.query_offset, ssmax=ssmax, prefilled=given)
            torch.log_softmax(out[0][0], -1)[torch.arange(4), torch.tensor(passes[0][1])].sum().backward()
        grads.append(ssmax.s.grad.clone())
        logits.append(out[0][0].detach())
    assert torch.allclose(logits[0], logits[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5) and grads[0].abs().sum() > 0
    assert all(p.grad is None for p in params)


def test_the_prefill_backward_chunk_by_chunk_equals_the_whole(models):
    """A step whose corpus is prefilled without autograd and whose prefill backward then runs
    a few documents at a time (how --chunk-tokens trains at 1,000 documents) gives every LoRA and
    s_L gradient of the step that keeps the whole prefill in its graph."""
    from lens.training import LearnedSSMax, backward_through_prefill, gradient_leaves, prefill_training_corpus

    model, data, runner = _setup(models)
    pool = runner.pool
    params = add_lora(model, 4, 8)
    named = {n: p for n, p in model.named_parameters() if "lora_" in n}
    torch.manual_seed(2)
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.05)
    q = data.queries[0]
    run = runner.run_query(q.id, 8, record=False)
    docs = [pool.doc_token_ids[d] for d in run.corpus]
    passes = [(pool.query_token_ids(model.tokenizer, q.id), [int(c) for c in run.decoded]),
              (pool.query_token_ids(model.tokenizer, data.queries[1].id), [3, 1, 4, 1])]
    grads = []
    for chunk in (None, 70):
        ssmax = LearnedSSMax(model.cfg.n_layers, init_n=4.0)
        for p in params:
            p.grad = None
        with torch.enable_grad():
            leaves = None
            if chunk:
                with torch.no_grad():
                    leaves = gradient_leaves(prefill_training_corpus(model, pool.instruction_ids, docs))
            out = layout_digit_logits(model, pool.instruction_ids, docs, passes, runner.digit_ids,
                                      query_offset=runner.layout.query_offset, ssmax=ssmax, prefilled=leaves)
            sum(torch.log_softmax(o[0], -1)[torch.arange(4), torch.tensor(code)].sum()
                for o, (_, code) in zip(out, passes)).backward()
            if chunk:
                backward_through_prefill(model, pool.instruction_ids, docs, leaves, chunk)
        grads.append({n: p.grad.clone() for n, p in named.items()} | {"s": ssmax.s.grad.clone()})
    whole, chunked = grads
    assert sum(map(len, docs)) > 2 * 70 and whole.keys() == chunked.keys()
    # layer 0's key adapter acts on the documents' keys (and on the query's own)
    assert whole["blocks.0.attn.k_proj.lora_A.default.weight"].abs().sum() > 0
    for n in whole:
        assert torch.allclose(whole[n], chunked[n], atol=1e-6, rtol=1e-4), n


def test_the_training_script_takes_the_same_step_with_the_prefill_backward_in_chunks(tmp_path):
    """`train_blocksearch.py --chunk-tokens` end to end: one step from the same seed gives the same
    loss and the same adapter as the step with the whole prefill in the graph."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    script = Path(__file__).parents[2] / "experiments" / "train_blocksearch.py"
    runs = {}
    for chunk in ("0", "300"):
        out = tmp_path / f"chunk{chunk}"
        subprocess.run([sys.executable, str(script), "--base", "tiny-llama", "--steps", "1", "--n-docs", "12",
                        "--mix", "pairs=1", "--queries", "3", "--rank", "4", "--alpha", "8", "--warmup", "1",
                        "--ssmax", "--dtype", "float32", "--chunk-tokens", chunk, "--out", str(out),
                        "--checkpoints", str(tmp_path / f"ckpt{chunk}")], check=True, capture_output=True)
        log = json.loads((out / "loss_log.jsonl").read_text().splitlines()[0])
        runs[chunk] = log["loss"], load_file(out / "adapter.safetensors"), log["tokens"]
    (loss0, whole, tokens), (loss5, chunked, _) = runs["0"], runs["300"]
    assert tokens > 2 * 300 and abs(loss0 - loss5) < 1e-5
    assert whole.keys() == chunked.keys() and "ssmax.s" in whole
    for name in whole:
        assert torch.allclose(whole[name].float(), chunked[name].float(), atol=1e-3, rtol=1e-2), name


def test_the_training_script_stops_after_a_step_and_resumes_from_it(tmp_path):
    """`--stop-after K` writes the adapter after step K of the --steps schedule (and says so);
    the same command with a later K resumes there."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "experiments" / "train_blocksearch.py"
    out = tmp_path / "adapter"
    base = [sys.executable, str(script), "--base", "tiny-llama", "--steps", "3", "--n-docs", "6", "--mix", "needle=1",
            "--queries", "2", "--rank", "4", "--alpha", "8", "--warmup", "1", "--save-every", "1", "--dtype",
            "float32", "--out", str(out), "--checkpoints", str(tmp_path / "ckpt")]
    for k, steps_logged in ((1, 1), (3, 3)):
        done = subprocess.run(base + ["--stop-after", str(k)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        config = json.loads((out / "adapter_config.json").read_text())
        assert config.get("stopped_after_step") == (k if k < 3 else None)
        assert [json.loads(l)["step"] for l in (out / "loss_log.jsonl").read_text().splitlines()] == list(
            range(1, steps_logged + 1))
    past = subprocess.run(base + ["--stop-after", "2"], capture_output=True, text=True)
    assert past.returncode != 0 and "past --stop-after 2" in past.stderr
