"""Small learners and samplers shared by the foundation tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from metalearn.core import Episode, InnerLearner, Support, TaskSampler
from metalearn.evaluation import evaluate_episodes
from metalearn.reload import evaluate_manifest, load_run
from metalearn.seeds import MANIFEST_SEED

# the minimal Omniglot sets beside the repository (../shared/data/omniglot)
OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
needs_omniglot = pytest.mark.skipif(
    not (OMNIGLOT / "images_background_small1.zip").exists(),
    reason=f"minimal Omniglot zips not found in {OMNIGLOT}")
needs_full_omniglot = pytest.mark.skipif(
    not (OMNIGLOT / "full" / "images_evaluation.zip").exists(),
    reason=f"full Omniglot zips not found in {OMNIGLOT / 'full'}")
# `--set`s of a quick Omniglot run: the minimal sets, their train and test alphabets, no
# validation split (one evaluation fewer to compile)
MINIMAL_NO_VALIDATION = ("data.protocol=minimal",
                         "data.train_alphabets=Balinese,Early_Aramaic,Korean,Latin",
                         "data.test_alphabets=Japanese_(katakana),Sanskrit,Tagalog")


@dataclasses.dataclass(frozen=True)
class ConstantSampler(TaskSampler):
    """Always the same tiny regression episode (the loss then depends on the meta-params only)."""

    def sample(self, key) -> Episode:
        """A fixed episode."""
        x = jnp.ones((2, 3))
        return Episode(x, jnp.zeros((2, 1)), x, jnp.zeros((2, 1)))


@dataclasses.dataclass(frozen=True)
class QuadraticLearner(InnerLearner):
    """Loss = sum_i scale_i (theta_i - target_i)^2: a test function for the outer loops."""

    dim: int = 8

    def target(self) -> jnp.ndarray:
        """The minimiser."""
        return jnp.linspace(-1.0, 1.0, self.dim)

    def init(self, key, example) -> dict:
        """Start at zero."""
        return {"theta": jnp.zeros(self.dim)}

    def adapt(self, meta, support: Support, key):
        """Nothing to adapt."""
        return None

    def predict(self, meta, state, query_x):
        """Unused."""
        return jnp.zeros((query_x.shape[0], 1))

    def loss(self, meta, episode, key):
        """A badly scaled quadratic."""
        scale = jnp.logspace(0, 1, self.dim)
        v = jnp.sum(scale * (meta["theta"] - self.target()) ** 2)
        return v, {"loss": v}


def assert_manifest_scores_like_memory(run_path: Path, tmp_path: Path, episodes: int = 3) -> None:
    """A run's test episodes exported to a manifest score as the same episodes in memory."""
    loaded = load_run(run_path)
    test, key = loaded.splits["test"], jax.random.PRNGKey(3)
    manifest = test.export_manifest(tmp_path / "episodes.json", key, episodes)
    from_file = evaluate_manifest(run_path, manifest)
    in_memory = evaluate_episodes(loaded.evaluator, loaded.meta, test.sample_batch(key, episodes),
                                  jax.random.PRNGKey(MANIFEST_SEED))
    assert from_file["accuracy"] == pytest.approx(in_memory["accuracy"], abs=1e-9)


def tensorboard_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of the TensorBoard event files in `logdir`, read as TensorBoard
    does: files in name order, and a session start at step s drops the values at steps >= s."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for f in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("Q", data[i:i + 8])
            ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
                out = {t: {s: v for s, v in vals.items() if s < ev.step}
                       for t, vals in out.items()}
            for v in ev.summary.value:
                out.setdefault(v.tag, {})[ev.step] = v.simple_value
    return out


@dataclasses.dataclass(frozen=True)
class InnerGD(InnerLearner):
    """Linear regression ([S, d] -> [S, 1]) learnt by `horizon` inner gradient steps from zero
    with meta-learned per-weight step sizes: a learner cheap to compile that every outer loop
    can train, the truncated one included (it unrolls in pieces)."""

    horizon: int = 4

    def init(self, key, example) -> dict:
        """Log step sizes, one per input dimension."""
        return {"log_lr": jnp.full(example.support_x.shape[-1], -1.0)}

    def _step(self, meta, w, x, y):
        return w - jnp.exp(meta["log_lr"])[:, None] * x.T @ (x @ w - y) / x.shape[0]

    def unroll_init(self, meta, episode, key):
        """The weights at inner step 0: zero."""
        return jnp.zeros((episode.support_x.shape[-1], 1))

    def unroll(self, meta, carry, episode, t0, steps):
        """`steps` inner steps; the loss is the mean query loss after each."""
        def body(w, _):
            w = self._step(meta, w, episode.support_x, episode.support_y)
            return w, 0.5 * jnp.mean((episode.query_x @ w - episode.query_y) ** 2)

        w, losses = jax.lax.scan(body, carry, None, length=steps)
        return w, jnp.mean(losses), {"loss": jnp.mean(losses)}

    def adapt(self, meta, support: Support, key):
        """The whole inner loop."""
        ep = Episode(support.x, support.y, support.x, support.y)
        return self.unroll(meta, self.unroll_init(meta, ep, key), ep, 0, self.horizon)[0]

    def predict(self, meta, state, query_x):
        """The linear model's outputs."""
        return query_x @ state
