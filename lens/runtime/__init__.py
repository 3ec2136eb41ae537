"""Running the BlockSearch layout on a hooked decoder: prefill, KV sources, query streams,
decoding, and the records they leave (see each module's docstring)."""

from lens.runtime.prefill import padded_documents, prefill_batch, run_instruction
from lens.runtime.records import CODE_DIGITS, DocumentKV, QueryRun
from lens.runtime.runner import BlockSearchRunner
from lens.runtime.stream import QueryStream, model_score_function

__all__ = ["BlockSearchRunner", "CODE_DIGITS", "DocumentKV", "QueryRun", "QueryStream", "model_score_function",
           "padded_documents", "prefill_batch", "run_instruction"]
