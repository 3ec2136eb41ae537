"""Running the BlockSearch layout on a hooked decoder: prefill, KV sources, query streams,
decoding, and the records they leave (see each module's docstring)."""

from lens.runtime.prefill import padded_documents, prefill_batch, run_instruction
from lens.runtime.records import CODE_DIGITS, DocumentKV, QueryRun
from lens.runtime.runner import BlockSearchRunner
from lens.runtime.stream import QueryStream, model_score_function



def make_runner(model, dataset, layout=None, **kw):
    """The runner for a loaded model: :class:`BlockSearchRunner` for lens's own decoder, the
    nnsight backend's :class:`~lens.runtime.hf_runner.HFRunner` for a model loaded with
    ``backend="nnsight"`` (which has no KV cache: ``kv`` must stay "memory", dense batching does not apply)."""
    if getattr(model, "backend", "lens") == "nnsight":
        from lens.errors import LensError
        from lens.runtime.hf_runner import HFRunner

        if kw.pop("kv", "memory") != "memory":
            raise LensError("--kv disk: the nnsight backend keeps no KV cache (each pass runs the whole context); "
                            "use --kv memory, or lens's own backend")
        for name in ("batch_dense", "kv_wait", "kv_folder", "batch_tokens"):
            kw.pop(name, None)
        return HFRunner(model, dataset, layout, **kw)
    return BlockSearchRunner(model, dataset, layout, **kw)


__all__ = ["BlockSearchRunner", "make_runner", "CODE_DIGITS", "DocumentKV", "QueryRun", "QueryStream", "model_score_function",
           "padded_documents", "prefill_batch", "run_instruction"]
