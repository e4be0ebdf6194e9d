"""Multi-process (multi-host) start-up: `jax.distributed.initialize` from the environment.

Every process runs the same command; the coordinator address, the process count and this
process's id come from `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES`
and `JAX_PROCESS_ID`, or from SLURM (`srun`), which JAX reads itself. On CPUs the processes
exchange data over gloo (TCP). Process 0 writes the run directory (config, metrics, plots,
summary); every process takes part in the computation and in saving and restoring checkpoints.
"""

from __future__ import annotations

import os
import socket
import sys
import time

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def settings_from_env(env: dict[str, str] | None = None) -> dict:
    """The `jax.distributed.initialize` arguments the environment gives ({} under SLURM)."""
    env = dict(os.environ if env is None else env)
    given = [v for v in ENV if v in env]
    if given:
        missing = [v for v in ENV if v not in env]
        if missing:
            raise ValueError(f"--distributed: {', '.join(given)} set but {', '.join(missing)} "
                             "not; set all three on every process: JAX_COORDINATOR_ADDRESS="
                             "host:port of process 0, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=0..N-1")
        try:
            n, i = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        except ValueError:
            raise ValueError(f"--distributed: JAX_NUM_PROCESSES={env['JAX_NUM_PROCESSES']!r} "
                             f"and JAX_PROCESS_ID={env['JAX_PROCESS_ID']!r} must be integers"
                             ) from None
        if not 0 <= i < n:
            raise ValueError(f"--distributed: JAX_PROCESS_ID={i} is not in 0..{n - 1} "
                             f"(JAX_NUM_PROCESSES={n})")
        return {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"], "num_processes": n,
                "process_id": i}
    if "SLURM_JOB_ID" in env:
        return {}
    raise ValueError("--distributed needs to know the other processes: set "
                     "JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and "
                     "JAX_PROCESS_ID on every process, or launch with SLURM's srun")


def initialize(timeout_s: int = 300, env: dict[str, str] | None = None) -> None:
    """Join the other processes (call before any other JAX work); gloo collectives on CPU."""
    import jax

    kw = settings_from_env(env)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    who = f"process {kw.get('process_id', '?')} of {kw.get('num_processes', '?')}"
    where = kw.get("coordinator_address", "the SLURM coordinator")
    hint = "start the same command on every process, with the same JAX_COORDINATOR_ADDRESS"
    if kw.get("process_id", 0) != 0 and not _reachable(kw["coordinator_address"], timeout_s):
        raise RuntimeError(f"--distributed: {who} could not reach the coordinator at {where} "
                           f"within {timeout_s} s (is process 0 running there?); {hint}")
    if kw.get("process_id") == 0:  # JAX ends this process itself if the others never come
        print(f"metalearn: {who} waits up to {timeout_s} s for the other "
              f"{kw['num_processes'] - 1} process(es) to join at {where}; {hint}",
              file=sys.stderr, flush=True)
    try:
        jax.distributed.initialize(**kw, initialization_timeout=timeout_s)
    except Exception as e:  # the client raises several types on a timeout
        raise RuntimeError(f"--distributed: {who} could not join the others at {where} within "
                           f"{timeout_s} s ({type(e).__name__}: {str(e)[:200]}); {hint}") from e


def _reachable(address: str, timeout_s: float) -> bool:
    """True once a TCP connection to host:port succeeds, retried until `timeout_s`."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)


def is_primary() -> bool:
    """True in the process that writes the run directory (process 0; always, on one host)."""
    import jax

    return jax.process_index() == 0
