"""Shared test settings: CPU, float32, deterministic, and XLA's code generation at -O0."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# The suite's time is mostly XLA compiling small programs that then run once or twice: LLVM at
# -O0 compiles them faster than it loses in running them. It changes how the code is generated,
# not what it computes (no fast-math either way). Set before jax is imported, so that
# subprocesses the tests start inherit it too.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_backend_optimization_level=0").strip()
