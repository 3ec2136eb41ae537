"""The options every way of running lens shares (CLI, sweep, app), and their checks, once."""

from __future__ import annotations

from dataclasses import dataclass

from lens.errors import LensError


@dataclass(frozen=True)
class RunOptions:
    """How a model meets a dataset: dtype, seed, and the layout's fields (None: the model's own)."""

    dtype: str = "auto"  # auto: lens.backend decides (bf16 only with native bf16 matmuls)
    seed: int = 0
    positions: str = "shared"
    code_position: str | None = None  # None: the model's own (blocksearch-135m: end)
    max_doc_tokens: int | None = None  # None: the model's own, else 256
    truncate: bool = False
    drop_unjudged: bool = False
    split: str | None = None  # a BEIR folder's qrels split (None: test)

    def torch_dtype(self):
        from lens.backend import resolve_dtype

        return resolve_dtype(self.dtype)

    def layout(self, model):
        from lens.data.layout import LayoutConfig

        return LayoutConfig.for_model(model, positions=self.positions, code_position=self.code_position,
                                      max_doc_tokens=self.max_doc_tokens, truncate=self.truncate)

    def dataset(self, spec: str):
        from lens.data.datasets import load_dataset

        return load_dataset(spec, seed=self.seed, drop_unjudged=self.drop_unjudged, split=self.split)


def parse_sizes(text: str, what: str = "--n") -> list[int]:
    """Corpus sizes from '16,64,256', in the order given."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LensError(f"{what} {text!r}: expected comma-separated integers, e.g. 16,64,256") from None
    if not values or min(values) < 1:
        raise LensError(f"{what} {text!r}: expected positive integers, e.g. 16,64,256")
    return values


def check_sizes(sizes: list[int], data, label: str = "N=") -> None:
    """Every N given once and no larger than the pool (``label`` names N in the message)."""
    repeated = sorted({n for n in sizes if sizes.count(n) > 1})
    if repeated:
        raise LensError(f"--n lists N={repeated[0]} more than once; give each corpus size once")
    pool = len(data.documents)
    too_big = [n for n in sizes if n > pool]
    if too_big:
        raise LensError(f"{label}{too_big[0]} is larger than the pool of {pool} documents in {data.name}; "
                        f"use N <= {pool}")


def check_queries(queries: int, data) -> None:
    if queries < 1 or queries > len(data.queries):
        raise LensError(f"--queries {queries}: {data.name} has {len(data.queries)} queries")


def read_config(path: str, allowed: set[str]) -> dict:
    """A TOML file of command options: keys are the flag names (``max-doc-tokens`` or
    ``max_doc_tokens``); ``n`` may be a list; ``intervention`` a string or a list."""
    import tomllib
    from pathlib import Path

    try:
        data = tomllib.loads(Path(path).expanduser().read_text())
    except OSError as err:
        raise LensError(f"--config {path}: {err.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise LensError(f"--config {path}: not valid TOML ({err})") from None
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in allowed:
            raise LensError(f"--config {path}: unknown option {key!r}; use the flag names of the command "
                            f"({', '.join(sorted(k.replace('_', '-') for k in allowed))})")
        if name == "n" and isinstance(value, list):
            value = ",".join(map(str, value))
        if name == "intervention" and isinstance(value, str):
            value = [value]
        out[name] = value
    return out
