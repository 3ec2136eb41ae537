"""Write docs/performance.md from benchmark runs on this machine (never typed in).

Runs each benchmark below as a subprocess, keeps its printed output, and replaces those
benchmarks' blocks in this CPU class's section of the page (keyed by the first line every
benchmark prints: CPU model, features, dtype, kernel path), leaving the section's other blocks and
other CPU classes' sections as they were measured.

    .venv/bin/python experiments/performance_page.py            # all benchmarks (~15 min on 2 cores)
    .venv/bin/python experiments/performance_page.py --only shard_merge
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 LENS_KERNEL=vec-avx2 \
        .venv/bin/python experiments/performance_page.py --only paths --dtype float32   # an AVX2 machine's paths

The environment is the benchmarks' own: a section measured under a capped instruction set says so
in its stamp line (``aten=AVX2``) and is shown with the variables that capped it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "performance.md"
PY = sys.executable
BENCHMARKS = {  # name -> (what it measures, command)
    "prefill": ("block-sparse document prefill against a plain transformers forward of the same documents",
                [PY, "experiments/bench_prefill.py", "--docs", "64", "--repeats", "2"]),
    "rerun": ("intervention reruns on a cached 1,000-document corpus (the lab's call), against the roof",
              [PY, "experiments/bench_kernels.py", "--part", "rerun"]),
    "overhead": ("the lab's call on 10 documents: the dense layers and Python by themselves",
                 [PY, "experiments/bench_kernels.py", "--part", "overhead"]),
    "shard_merge": ("sharded corpus attention: the merge's cost beside one stream",
                    [PY, "experiments/bench_shard_merge.py"]),
    "sweep": ("one sweep unit's query work with its streams' dense layers batched, against each stream its own",
              [PY, "experiments/bench_sweep.py", "--n", "16,64", "--queries", "16"]),
    "paths": ("the lab's call on a cached 1,000-document corpus on lens's kernel path and PyTorch's, in turns",
              [PY, "experiments/bench_kernels.py", "--part", "paths"]),
    "paths_trained": ("the same call on blocksearch-135m, a model trained for the task, whose codes let more drafts stand",
                      [PY, "experiments/bench_kernels.py", "--part", "paths", "--model", "blocksearch-135m"]),
    "lab256": ("the lab's call at N=256 on blocksearch-135m (the app's default model), on each path in turns",
               [PY, "experiments/bench_kernels.py", "--part", "paths", "--model", "blocksearch-135m", "--rerun-docs", "256"]),
    "tl": ("gold statistics end to end from text, lens against TransformerLens run_with_cache at the largest T it holds",
           [PY, "experiments/bench_kernels.py", "--part", "tl"]),
    "kv": ("the lab's call in fp32 with the corpus's KV cached in fp32 or in bf16, in turns",
           [PY, "experiments/bench_kernels.py", "--part", "kv"]),
}
CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "LENS_KERNEL")
BEGIN, END = "<!-- measured: {} -->", "<!-- end measured -->"


def run(names: list[str], dtype: str) -> tuple[str, str, dict[str, str]]:
    """(the section's key, the stamp line, each benchmark's block of markdown)."""
    stamp, blocks = None, {}
    when = datetime.date.today().isoformat()
    for name in names:
        what, cmd = BENCHMARKS[name]
        cmd = cmd + ["--dtype", dtype]
        print(f"running {name}: {' '.join(cmd[1:])}", file=sys.stderr)
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stderr[-2000:]}")
        lines = done.stdout.strip().splitlines()
        stamp = stamp or lines[0]
        env = " ".join(f"{k}={os.environ[k]}" for k in CAPS if k in os.environ)
        shown = " ".join(([env] if env else []) + ["python"] + [c for c in cmd[1:]])
        blocks[name] = f"### {name}: {what}\n\nMeasured {when}: `{shown}`\n\n```\n" + "\n".join(lines) + "\n```\n"
    return re.sub(r" threads=\d+", "", stamp), stamp, blocks


def merged_section(key: str, stamp: str, blocks: dict[str, str], old: str | None) -> str:
    """This CPU class's section: the blocks just measured, and the old section's blocks of the
    benchmarks not rerun (each block carries the date it was measured)."""
    kept = {}
    if old:
        dated = re.search(r"Measured (\d{4}-\d\d-\d\d) by", old)  # a section written before blocks carried dates
        for part in re.split(r"(?m)^(?=### )", old)[1:]:
            name = part.split(":", 1)[0].removeprefix("### ").strip()
            part = part.replace(END, "").rstrip() + "\n"
            if dated and "\nMeasured " not in part:
                head, rest = part.split("\n\n`", 1)
                part = f"{head}\n\nMeasured {dated.group(1)}: `{rest}"
            kept[name] = part
    kept.update(blocks)
    order = [n for n in BENCHMARKS if n in kept] + [n for n in kept if n not in BENCHMARKS]
    return (BEGIN.format(key) + f"\n## {stamp}\n\nWritten by `experiments/performance_page.py`; each block "
            "gives the day it was measured.\n\n" + "\n".join(kept[n] for n in order) + END)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated: " + ", ".join(BENCHMARKS))
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    args = parser.parse_args()
    key, stamp, blocks = run([n.strip() for n in args.only.split(",")], args.dtype)
    page = PAGE.read_text()
    pattern = re.compile(re.escape(BEGIN.format(key)) + r".*?" + re.escape(END), re.S)
    found = pattern.search(page)
    section = merged_section(key, stamp, blocks, found.group(0) if found else None)
    page = pattern.sub(lambda _: section, page) if found else page.rstrip() + "\n\n" + section + "\n"
    PAGE.write_text(page)
    print(f"wrote {PAGE.relative_to(ROOT)}: {key}")


if __name__ == "__main__":
    main()
