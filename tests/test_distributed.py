"""Multi-process meta-training, tested on one machine: two processes joined over gloo on
127.0.0.1, one CPU device each, give the numbers of one process with two devices (the same
mesh), for both outer loops, and a two-process run stopped and resumed continues exactly.

The processes are started and ended here, on the loopback address, each bounded in time."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from metalearn.distributed import settings_from_env
from metalearn.reload import load_run

TIMEOUT = 300  # seconds per process
SMALL = ["--set", "outer.batch_size=4", "--set", "test_episodes=20", "--set", "eval_episodes=20",
         "--set", "checkpoint_every=3", "--no-progress"]
LOOPS = {"gradient": [], "evolution": ["--set", "outer.kind=evolution",
                                       "--set", "outer.evolution.population_size=4"]}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "metalearn.cli", *args]


def two_processes(*args: str) -> list[subprocess.CompletedProcess]:
    """`metalearn ARGS --distributed` in two processes joined on 127.0.0.1."""
    port = _port()
    procs = [subprocess.Popen(
        _cli(*args, "--distributed"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                 JAX_PROCESS_ID=str(i))) for i in range(2)]
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=TIMEOUT)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            p.kill()
    for r in out:
        assert r.returncode == 0, r.stderr[-2000:]
    return out


def one_process_two_devices(*args: str) -> subprocess.CompletedProcess:
    """`metalearn ARGS` in one process with two simulated CPU devices."""
    r = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=TIMEOUT,
                       env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def train_records(run_dir) -> list[dict]:
    """The training metrics of a run."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_two_processes_give_the_numbers_of_one_and_resume_exactly(tmp_path, loop):
    train = ["train", "linreg_sgd", *SMALL, *LOOPS[loop]]
    multi, single, resumed = tmp_path / "multi", tmp_path / "single", tmp_path / "resumed"
    out = two_processes(*train, "--set", "steps=6", "--run-dir", str(multi))
    assert "test: loss=" in out[0].stdout and "test:" not in out[1].stdout  # process 0 reports
    one_process_two_devices(*train, "--set", "steps=6", "--run-dir", str(single))
    assert train_records(multi) == train_records(single) and len(train_records(multi)) == 6
    summary = [json.loads((d / "summary.json").read_text())["test"] for d in (multi, single)]
    assert summary[0] == summary[1]
    a, b = load_run(multi), load_run(single)
    assert a.step == b.step == 6
    jax.tree.map(np.testing.assert_array_equal, a.meta, b.meta)
    # stopped at step 3 (a checkpoint), resumed by both processes: the same 6 steps
    two_processes(*train, "--set", "steps=3", "--run-dir", str(resumed))
    two_processes("train", "--resume", "--run-dir", str(resumed), "--set", "steps=6",
                  "--no-progress")
    assert train_records(resumed) == train_records(multi)
    jax.tree.map(np.testing.assert_array_equal, load_run(resumed).meta, a.meta)


@pytest.mark.slow
def test_a_batch_that_does_not_split_over_both_processes_is_refused(tmp_path):
    port = _port()
    env = _env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2")
    procs = [subprocess.Popen(_cli("train", "linreg_sgd", "--distributed", "--run-dir",
                                   str(tmp_path / "r"), *SMALL, "--set", "outer.batch_size=3"),
                              stderr=subprocess.PIPE, text=True,
                              env={**env, "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    try:
        errs = [p.communicate(timeout=TIMEOUT)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all("batch_size=3 must be divisible by the 2 devices" in e for e in errs), errs


@pytest.mark.slow
@pytest.mark.parametrize("process", [0, 1])
def test_a_process_whose_peers_never_come_says_so(process):
    """Process 1 without a coordinator stops with our message; process 0 (the coordinator)
    says how long it waits before JAX ends it."""
    port = _port()
    code = ("from metalearn.distributed import initialize; initialize(timeout_s=5, env="
            f"{{'JAX_COORDINATOR_ADDRESS': '127.0.0.1:{port}', 'JAX_NUM_PROCESSES': '2', "
            f"'JAX_PROCESS_ID': '{process}'}})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env=_env())
    assert r.returncode != 0
    want = ("process 1 of 2 could not reach the coordinator at 127.0.0.1" if process else
            "process 0 of 2 waits up to 5 s for the other 1 process(es)")
    assert want in r.stderr, r.stderr[-1500:]


def test_the_environment_names_what_is_missing():
    full = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
            "JAX_PROCESS_ID": "3"}
    assert settings_from_env(full) == {"coordinator_address": "10.0.0.1:1234",
                                       "num_processes": 4, "process_id": 3}
    assert settings_from_env({"SLURM_JOB_ID": "7"}) == {}
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID not"):
        settings_from_env({"JAX_COORDINATOR_ADDRESS": "h:1"})
    with pytest.raises(ValueError, match="JAX_PROCESS_ID=4 is not in 0..3"):
        settings_from_env({**full, "JAX_PROCESS_ID": "4"})
    with pytest.raises(ValueError, match="must be integers"):
        settings_from_env({**full, "JAX_NUM_PROCESSES": "four"})
    with pytest.raises(ValueError, match="set JAX_COORDINATOR_ADDRESS .* or launch with SLURM"):
        settings_from_env({})
