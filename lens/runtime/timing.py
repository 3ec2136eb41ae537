"""Where a runner's time goes: seconds in prefill, corpus attention (the chunk feed, with the
compiled kernel's statistics), finishing each layer's streams (self keys, statistics handed
over) and recording the readout statistics, measured by wrapping the runner's own methods; the
rest of a call is the dense layers, the decoding steps and Python."""

from __future__ import annotations

import time

PARTS = ("prefill", "corpus attention", "finish", "readout statistics")
REST = "dense layers, decoding, Python"


class Breakdown:
    def __init__(self, runner):
        self.runner, self.spent = runner, dict.fromkeys(PARTS, 0.0)
        source = getattr(runner, "source", None)
        for attr, owner, name in (("prefill", source, "prefill"), ("feed", source, "corpus attention"),
                                  ("_close_stream", runner, "finish"), ("_record", runner, "readout statistics")):
            if hasattr(owner, attr):  # the nnsight backend has no KV source: its passes count as the rest
                setattr(owner, attr, self._timed(getattr(owner, attr), name))

    def _timed(self, fn, name):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.spent[name] += time.perf_counter() - t0
        return wrapper

    def reset(self) -> None:
        self.spent = dict.fromkeys(self.spent, 0.0)

    @staticmethod
    def text(spent: dict, total: float) -> str:
        """``spent`` as seconds and shares of ``total`` (the query work: prefill left out)."""
        parts = {k: v for k, v in spent.items() if k != "prefill"}
        parts[REST] = total - sum(parts.values())
        return ", ".join(f"{k} {v:.2f} s ({v / total:.0%})" for k, v in parts.items()) if total > 0 else "nothing timed"


def throughput(units: list[dict]) -> dict:
    """Totals over a sweep's timed units (each: ``n``, ``queries``, ``interventions``, ``seconds``
    and the :data:`PARTS`): query work (without prefill), queries x cells, and per minute."""
    spent = {k: sum(u.get(k, 0.0) for u in units) for k in PARTS}
    seconds = sum(u["seconds"] for u in units)
    runs = sum(u["queries"] * u["interventions"] for u in units)
    work = seconds - spent["prefill"]
    return dict(units=len(units), query_cells=runs, seconds=seconds, prefill_seconds=spent["prefill"],
                query_seconds=work, per_minute=runs / work * 60 if work > 0 else None, spent=spent)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def throughput_text(total: dict) -> str:
    rate = f"{total['per_minute']:.0f}" if total["per_minute"] else "-"
    return (f"query work {_duration(total['query_seconds'])} for {total['query_cells']} queries x cells "
            f"({rate} per minute), prefill {_duration(total['prefill_seconds'])}, over {total['units']} units; "
            + Breakdown.text(total["spent"], total["query_seconds"]))
