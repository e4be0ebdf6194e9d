"""The HyperTransformer: what it generates, in which layout, from which support information."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.core import Support
from metalearn.learners.hypertransformer import HyperTransformer
from metalearn.nn import CNN, init_transformer, transformer
from metalearn.outer.gradient import GradientOuterLoop
from metalearn.tasks.fewshot import FewShotSampler
from metalearn.tasks.testing import synthetic_dataset
from tests.helpers import (
    MINIMAL_NO_VALIDATION,
    assert_manifest_scores_like_memory,
    needs_omniglot,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL = dict(ways=3, channels=4, num_blocks=2, embed_dim=8, shared_features=4,
             local_features=4, num_layers=2)


@cache
def sampler(unlabeled: int = 0) -> FewShotSampler:
    """3-way 2-shot 2-query episodes of 8x8 synthetic images (+ unlabeled per class)."""
    return FewShotSampler(synthetic_dataset(classes=12, examples=8, size=8), 3, 2, 2, unlabeled)


def setup(**kw):
    """A small HyperTransformer (SMALL with `kw`), its initial meta-parameters, an episode."""
    ht = HyperTransformer(**{**SMALL, **kw})
    ep = sampler().example()
    return ht, ht.init(jax.random.PRNGKey(0), ep), ep


def test_transformer_is_permutation_equivariant_and_masks():
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 12))
    layers = init_transformer(jax.random.PRNGKey(1), 12, num_layers=2, heads=3)
    perm = np.array([3, 1, 5, 0, 2, 4])
    np.testing.assert_allclose(transformer(layers, x[perm], 3), transformer(layers, x, 3)[perm],
                               rtol=1e-5, atol=1e-5)
    # a token that nobody may attend to changes no other token's output
    mask = jnp.ones((6, 6), bool).at[:, 5].set(False).at[5, 5].set(True)
    a = transformer(layers, x, 3, mask)
    b = transformer(layers, x.at[5].set(100.0), 3, mask)
    np.testing.assert_allclose(a[:5], b[:5], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", ["conv-bn-relu-pool", "conv-relu-pool-bn"])
def test_generated_cnn_is_a_plain_cnn_with_the_predicted_logits(order):
    """The generated CNN, in either block order, is the plain CNN of that order, with the
    support's statistics at every block."""
    ht, meta, ep = setup(block_order=order)
    state = jax.jit(ht.adapt)(meta, ep.support(), None)
    params = state["params"]
    cnn = CNN(4, 2, out_dim=3, block_order=order)
    ref = cnn.init(jax.random.PRNGKey(0), ep.support_x)
    assert jax.tree.structure(params) == jax.tree.structure(ref)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref)
    _, support_stats = cnn.apply(params, ep.support_x)  # labelled support only here
    for got, want in zip(state["stats"], support_stats, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    logits, _ = cnn.apply(params, ep.query_x, state["stats"])
    np.testing.assert_allclose(ht.predict(meta, state, ep.query_x), logits, rtol=1e-6)


def test_first_kernel_from_a_hand_built_token_sequence():
    """Layer 1's kernel is the transformer over [mu_j ; 0] and [xi(c_i) ; h(x_i) ; s(x_i) ; 0]
    tokens, read from placeholder j's outputs past d, scaled by 1/sqrt(9 C_in), laid out
    [3, 3, C_in, C_out] (the official code's output-channel allocation)."""
    ht, meta, ep = setup()
    x, y = np.asarray(ep.support_x), np.asarray(ep.support_y)
    gen, d = meta["generators"][0], ht.embed_dim
    f1, f2 = gen["features"]
    conv = lambda h, w: jax.lax.conv_general_dilated(
        h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    z1 = conv(x, f1)[:, ::2, ::2]  # two 3x3 convs, stride 2 then 1, ReLU between
    z2 = conv(jax.nn.relu(z1), f2)
    local = jnp.concatenate([z1.mean((1, 2)), z2.mean((1, 2))], -1)
    h = x
    for i, w in enumerate(meta["shared"]):
        h = jax.nn.relu(conv(h, w))
        h = h[:, ::2, ::2] if i < 3 else h
    shared = h.mean((1, 2))
    c_in, size = x.shape[-1], 9 * x.shape[-1]
    width = d + max(size, local.shape[1] + shared.shape[1])
    samples = jnp.concatenate([gen["labels"][y], local, shared], -1)
    tokens = jnp.concatenate([
        jnp.pad(gen["placeholders"], ((0, 0), (0, width - d))),
        jnp.pad(samples, ((0, 0), (0, width - samples.shape[1])))])
    out = transformer(gen["transformer"], tokens, ht.heads)[:ht.channels, d:d + size]
    want = jnp.moveaxis(out.reshape(ht.channels, 3, 3, c_in), 0, -1) / np.sqrt(size)
    got = ht.generated(meta, ep.support())["blocks"][0]["w"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_batch_norm_batch_makes_queries_depend_on_their_batch():
    ht, meta, ep = setup()
    for mode, alone in (("support", True), ("batch", False)):
        m = HyperTransformer(**{**SMALL, "batch_norm": mode})
        state = m.adapt(meta, ep.support(), None)
        full = m.predict(meta, state, ep.query_x)[:2]
        part = m.predict(meta, state, ep.query_x[:2])
        assert np.allclose(full, part, rtol=1e-5, atol=1e-5) == alone, mode
    with pytest.raises(ValueError, match="batch_norm='global'"):
        HyperTransformer(batch_norm="global")


def test_generated_weights_ignore_the_order_of_the_support():
    ht, meta, ep = setup()
    perm = np.random.default_rng(0).permutation(ep.support_x.shape[0])
    a = ht.generated(meta, ep.support())
    b = ht.generated(meta, Support(ep.support_x[perm], ep.support_y[perm]))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_the_support_decides_the_weights():
    ht, meta, ep = setup()
    other = sampler().sample(jax.random.PRNGKey(7))
    a, b = ht.generated(meta, ep.support()), ht.generated(meta, other.support())
    for x, y in zip(jax.tree.leaves(a["head"]) + [a["blocks"][0]["w"]],
                    jax.tree.leaves(b["head"]) + [b["blocks"][0]["w"]], strict=True):
        assert not np.allclose(x, y)


def test_given_conv_slices_replace_the_generated_kernels():
    ht, meta, ep = setup()
    other = sampler().sample(jax.random.PRNGKey(7)).support()
    own = ht.adapt(meta, ep.support(), None)
    same = ht.adapt_with_slices(meta, ep.support(), ht.conv_slices(meta, ep.support()))
    np.testing.assert_allclose(ht.predict(meta, same, ep.query_x),
                               ht.predict(meta, own, ep.query_x), rtol=1e-5, atol=1e-5)
    swapped = ht.adapt_with_slices(meta, ep.support(), ht.conv_slices(meta, other))
    for a, b in zip(swapped["params"]["blocks"], ht.generated(meta, other)["blocks"],
                    strict=True):
        np.testing.assert_allclose(a["w"], b["w"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(swapped["params"]["head"]["w"], own["params"]["head"]["w"])


def test_mean_kernels_of_one_episode_are_its_own_kernels(monkeypatch):
    """examples/generated_kernels.py: `MeanKernels` given one episode's own slices scores that
    episode as the HyperTransformer does; `spread` is 0 for equal kernels, the RMS deviation
    otherwise."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import generated_kernels as gk

    ht, meta, ep = setup()
    fixed = {"ht": meta, "slices": ht.conv_slices(meta, ep.support())}
    ours = gk.MeanKernels(ht)
    np.testing.assert_allclose(ours.loss(fixed, ep, None)[0], ht.loss(meta, ep, None)[0],
                               rtol=1e-5)
    k = np.ones((4, 3, 3, 1, 2))
    assert gk.spread(k)["spread"] == 0.0
    k[0] += 4.0  # deviations 3 (episode 0) and -1 (the others) from the mean 2
    np.testing.assert_allclose(gk.spread(k)["spread"], np.sqrt((9 + 3) / 4))


def test_logits_only_keeps_the_trained_blocks():
    ht, meta, ep = setup(trained_blocks=2)
    params = ht.generated(meta, ep.support())
    for i in range(2):
        np.testing.assert_array_equal(params["blocks"][i]["w"], meta["cnn"]["blocks"][i]["w"])
    assert len(meta["generators"]) == 1  # the logits layer only
    ht1, meta1, _ = setup(trained_blocks=1)
    assert "w" in meta1["cnn"]["blocks"][0] and "w" not in meta1["cnn"]["blocks"][1]
    assert len(meta1["generators"]) == 2


def test_a_learned_base_is_added_to_the_generated_kernels():
    ht, meta, ep = setup(learned_base=True)
    assert all("w" in b for b in meta["cnn"]["blocks"])
    with_base = ht.generated(meta, ep.support())
    plain = HyperTransformer(**SMALL).generated(meta, ep.support())  # ignores the bases
    base = meta["cnn"]["blocks"][0]["w"]
    np.testing.assert_allclose(with_base["blocks"][0]["w"] - plain["blocks"][0]["w"], base,
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(with_base["blocks"][0]["w"], base)  # still generated on top
@pytest.mark.slow  # compiling-heavy; the default suite keeps under 10 min


def test_unlabeled_images_shape_the_weights_not_the_statistics():
    ht = HyperTransformer(**SMALL)
    ep = sampler(2).example()
    meta = ht.init(jax.random.PRNGKey(0), ep)
    with_u = ht.adapt(meta, ep.support(), None)
    without = ht.adapt(meta, Support(ep.support_x, ep.support_y), None)
    assert ep.unlabeled_x.shape[0] == 6
    assert not np.allclose(with_u["params"]["head"]["w"], without["params"]["head"]["w"])
    # the first layer's statistics come from the labelled support under that layer's weights
    z = jax.lax.conv_general_dilated(ep.support_x, with_u["params"]["blocks"][0]["w"], (1, 1),
                                     "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(with_u["stats"][0].mean, jnp.mean(z, axis=(0, 1, 2)), rtol=1e-4,
                               atol=1e-5)


def test_classes_absent_from_the_support_are_masked():
    ht = HyperTransformer(**{**SMALL, "ways": 5})
    ep = sampler().example()  # 3-way episodes for a 5-way generator
    meta = ht.init(jax.random.PRNGKey(0), ep)
    logits = ht.predict(meta, ht.adapt(meta, ep.support(), None), ep.query_x)
    assert logits.shape == (6, 5) and bool(jnp.all(logits[:, 3:] < -1e29))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="trained_blocks must be in 0..num_blocks=2"):
        HyperTransformer(**{**SMALL, "trained_blocks": 3})
    ht = HyperTransformer(**{**SMALL, "ways": 2})
    with pytest.raises(ValueError, match=r"3 classes.*2-way.*set ways=3 or more"):
        ht.init(jax.random.PRNGKey(0), sampler().example())


@pytest.mark.slow
def test_meta_training_lowers_the_query_loss():
    """The generator first sits on the plateau where every class gets the same logits row
    (loss ln 3, about 400 steps here), then learns to read the labels: 95% after 2000."""
    tasks = FewShotSampler(synthetic_dataset(classes=12, examples=8, size=16), 3, 2, 2)
    ht = HyperTransformer(**{**SMALL, "num_blocks": 4, "trained_blocks": 4})
    outer = GradientOuterLoop(learning_rate=1e-3, batch_size=8)
    state = outer.init(ht, tasks, jax.random.PRNGKey(0))
    state, m = outer.compiled_steps(ht, tasks)(state, 1000)
    loss, acc = np.asarray(m["loss"]), np.asarray(m["accuracy"])
    assert loss[-100:].mean() < 0.6 * loss[:100].mean() and acc[-100:].mean() > 0.6, loss


def test_episodes_in_sequence_give_the_numbers_of_vmapped_episodes():
    """`sequential` (generation vmapped, the query CNNs one episode after another) changes the
    speed, not the numbers: every episode's loss and accuracy, and the gradient."""
    import dataclasses

    from metalearn.core import batch_loss

    learner = HyperTransformer(ways=3, channels=4, num_blocks=1, embed_dim=8, shared_features=4,
                               local_features=4, num_layers=1)
    sampler = FewShotSampler(synthetic_dataset(classes=12, examples=6, size=8), 3, 2, 2)
    meta = learner.init(jax.random.PRNGKey(0), sampler.example())
    batch = sampler.sample_batch(jax.random.PRNGKey(1), 3)
    assert learner.sequential_episodes
    assert not dataclasses.replace(learner, trained_blocks=1).sequential_episodes

    def metrics(lr):  # the loss and accuracy of every episode, and the gradient
        return jax.jit(jax.grad(lambda m: batch_loss(lr, m, batch, jax.random.PRNGKey(2)),
                                has_aux=True))(meta)

    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
                 metrics(learner), metrics(dataclasses.replace(learner, sequential=False)))


# ---------------------------------------------------------------- real data, end to end

@pytest.mark.slow  # 64 s all-layer, 24 s logits only: compiles training, evaluation, reports
@needs_omniglot
@pytest.mark.parametrize("mode", ["all_layers_semi_supervised", "logits_only"])
def test_ht_omniglot_trains_evaluates_and_reads_manifests(mode, tmp_path, capsys,
                                                           monkeypatch):
    """`ht_omniglot` in both modes: train, reload, `evaluate` at another setting, manifests."""
    from metalearn.cli import main
    from metalearn.reload import load_run
    from metalearn.training import train

    semi = mode.endswith("semi_supervised")
    sets = ["steps=3", "eval_every=0", "eval_episodes=3", "checkpoint_every=0",
            "test_episodes=3", "report_episodes=3", "report_settings=3x1x2",
            "learner.channels=4", "learner.num_layers=1", "learner.embed_dim=8",
            "learner.shared_features=4", "learner.local_features=4",
            f"learner.trained_blocks={0 if semi else 4}", f"task.unlabeled={int(semi)}",
            "task.ways=5", "task.queries=2", "task.eval_queries=2", "outer.batch_size=2",
            "outer.steps_per_call=3", *MINIMAL_NO_VALIDATION]
    run, summary = train("ht_omniglot", sets, run_dir=tmp_path / "run", progress=False)
    assert summary["test"]["episodes"] == 3 and "test_3way_1shot" in summary
    loaded = load_run(run.path)
    assert loaded.step == 3 and loaded.learner.trained_blocks == (0 if semi else 4)
    assert len(loaded.meta["generators"]) == (5 if semi else 1)
    assert loaded.splits["test"].unlabeled == int(semi)
    assert main(["evaluate", str(run.path), "--episodes", "3", "--ways", "4",
                 "--unlabeled", "2"]) == 0
    assert "test ways=4 shots=1 queries=2 unlabeled=2" in capsys.readouterr().out
    assert_manifest_scores_like_memory(run.path, tmp_path)
    if semi:  # examples/generated_kernels.py: the spread of the kernels, the mean-kernel score
        monkeypatch.syspath_prepend(str(EXAMPLES))
        import generated_kernels

        generated_kernels.main([str(run.path), "--reference", "3"])
        out = capsys.readouterr().out
        assert out.count("spread across episodes") == 4
        score = summary["test"]["accuracy"] * 100
        assert f"generated: accuracy {score:.2f}" in out and "mean kernels: accuracy" in out
