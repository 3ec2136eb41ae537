"""Sweeps on a local Ray cluster: the records are the single-process sweep's, bit for bit, also
when a worker is killed mid-sweep or the driver stops and the same sweep is resumed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ray = pytest.importorskip("ray", reason="Ray is the optional extra lens[ray] (make setup installs it)")

from lens.errors import LensError  # noqa: E402
from lens.sweep import SweepConfig, run_sweep  # noqa: E402

CFG = dict(model="tiny-llama", dataset="synthetic-limit:docs=30,items=5,queries=6", n=[4, 12, 30], queries=6, batch=2,
           interventions=["none", "ssmax:s=0.43,n=docs", "route:layer=1,B=3"], dtype="float32")
RAY = dict(address="auto", workers=2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local cluster whose actors (and this process) use a fresh lens cache."""
    old = os.environ.get("LENS_CACHE")
    os.environ["LENS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield Path(os.environ["LENS_CACHE"])
    ray.shutdown()
    if old is None:
        del os.environ["LENS_CACHE"]
    else:
        os.environ["LENS_CACHE"] = old


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    out = tmp_path_factory.mktemp("ray") / "local"
    run_sweep(SweepConfig(**CFG), out, progress=False)
    return out


def _same(a: Path, b: Path):
    pd.testing.assert_frame_equal(pd.read_parquet(a / "records.parquet"), pd.read_parquet(b / "records.parquet"),
                                  check_exact=True)
    assert json.loads((a / "summary.json").read_text()) == json.loads((b / "summary.json").read_text())
    assert sorted(p.name for p in (a / "parts").iterdir()) == sorted(p.name for p in (b / "parts").iterdir())
    for part in (a / "parts").iterdir():
        pd.testing.assert_frame_equal(pd.read_parquet(part), pd.read_parquet(b / "parts" / part.name), check_exact=True)


def test_a_ray_sweep_writes_the_single_process_records(cluster, local, tmp_path):
    done = []
    run_sweep(SweepConfig(**CFG), tmp_path / "ray", progress=False, ray=RAY, on_unit=lambda d, t: done.append((d, t)))
    assert done == [(i, 9) for i in range(1, 10)]  # every unit counted once, across both workers
    _same(local, tmp_path / "ray")


def _worker_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"SweepActor" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def test_a_worker_killed_mid_sweep_has_its_unit_rerun(cluster, local, tmp_path):
    killed = []

    def kill_one(done, total):
        if not killed:  # the other worker is mid-unit now; kill whichever the kernel lists first
            time.sleep(0.5)
            pid = _worker_pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    run_sweep(SweepConfig(**CFG), tmp_path / "ray", progress=False, ray=RAY, on_unit=kill_one)
    assert killed and killed[0] not in _worker_pids()
    _same(local, tmp_path / "ray")


def test_a_stopped_driver_resumes_with_the_same_sweep(cluster, local, tmp_path):
    out = tmp_path / "ray"

    def stop(done, total):
        if done == 3:
            raise KeyboardInterrupt  # the driver dies after three committed units

    with pytest.raises(KeyboardInterrupt):
        run_sweep(SweepConfig(**CFG), out, progress=False, ray=RAY, on_unit=stop)
    assert len(list((out / "parts").glob("*.parquet"))) == 3 and not (out / "records.parquet").exists()
    deadline = time.time() + 30
    while _worker_pids() and time.time() < deadline:  # its actors go with it (ray.kill is asynchronous)
        time.sleep(0.2)
    assert not _worker_pids()
    resumed = []
    run_sweep(SweepConfig(**CFG), out, progress=False, ray=RAY, on_unit=lambda d, t: resumed.append(d))
    assert resumed == list(range(4, 10))  # only the six units left
    _same(local, out)


def test_a_worker_that_sees_other_data_is_refused(cluster, tmp_path, monkeypatch):
    from lens.data.datasets import Dataset

    real = Dataset.content_hash
    monkeypatch.setattr(Dataset, "content_hash", lambda self: "not-the-workers")  # the driver's view differs
    with pytest.raises(LensError, match="differs here from the driver's"):
        run_sweep(SweepConfig(**CFG), tmp_path / "ray", progress=False, ray=RAY)
    monkeypatch.setattr(Dataset, "content_hash", real)
    assert not (tmp_path / "ray" / "sweep.json").exists()


def test_the_cli_sweeps_on_a_local_ray_cluster(local, tmp_path):
    args = ["--model", "tiny-llama", "--dataset", CFG["dataset"], "--n", "4,12,30", "--queries", "6", "--batch", "2",
            "--dtype", "float32", "--ray", "local", "--ray-workers", "2"]
    for spec in CFG["interventions"]:
        args += ["--intervention", spec]
    done = subprocess.run([sys.executable, "-m", "lens.cli", "sweep", *args, "--out", str(tmp_path / "cli")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    _same(local, tmp_path / "cli")


def test_workers_share_one_disk_kv_cache(cluster, tmp_path):
    """--kv disk on a shared cache folder: both actors start on an empty cache, one builds it while
    the other waits and reads it; a single-process sweep then reads the same cache and writes the
    same records."""
    cfg = dict(CFG, kv="disk", n=[12, 30])
    kv = cluster / "kv"
    assert not kv.exists()
    run_sweep(SweepConfig(**cfg), tmp_path / "ray", progress=False, ray=RAY)
    built = sorted(p.name for p in kv.iterdir() if not p.name.startswith("."))
    assert len(built) == 1 and not built[0].endswith(".partial")
    run_sweep(SweepConfig(**cfg), tmp_path / "local", progress=False)
    assert sorted(p.name for p in kv.iterdir() if not p.name.startswith(".")) == built
    _same(tmp_path / "local", tmp_path / "ray")
