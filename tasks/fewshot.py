"""N-way K-shot few-shot classification episodes, gathered inside `jit` from a device array.

An episode picks `ways` distinct classes (of the dataset, or of dataset x {0, 90, 180, 270}
degree rotations when `rotations=True`; with `random_rotation=True` each chosen class is turned
by its own random multiple of 90 degrees instead, an augmentation that adds no classes), then
`shots + queries + unlabeled` distinct examples of each class, so no query or unlabeled image is
a copy of a support image. Classes are taken in a random order and labelled by position, so the
class->label map is a fresh permutation per episode; the support and query sets are also shuffled
(a sequence model cannot read the label off the position). Everything is `jax.random` on the
dense class-major uint8 array held on device once; a batch of episodes is a `vmap` over keys.

Fixed evaluation episodes: `export_manifest` writes sampled episodes as JSON or CSV (class,
example index, rotation, image path and label of every image) and `episodes_from_manifest`
reads them back - or a user's own manifest of image files - with the training preprocessing;
the file format is in `metalearn.tasks.data.manifest`.

One module, past the usual size: the sampler, its in-`jit` gather and the checks of a request
are one mechanism a reader follows top to bottom.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import metalearn.tasks.augment as _augment
from metalearn.core import Array, Episode, TaskSampler
from metalearn.messages import in_cli, option, setting
from metalearn.tasks.augment import Augment
from metalearn.tasks.data.datasets import ImageDataset
from metalearn.tasks.data.manifest import export_manifest, manifest_episodes

NORMALIZE = ("unit", "centered", "standard", "invert", "none")
GROUP_WEIGHTING = ("classes", "uniform")


class ImageRefs(NamedTuple):
    """Which images make up one set of an episode: base class, example index, rotation, label."""

    cls: Array  # int32 [n] index of the class in the dataset
    example: Array  # int32 [n] index of the example within its class
    rotation: Array  # int32 [n] quarter turns counter-clockwise (0..3)
    label: Array  # int32 [n] episode label in [0, ways)
    affine: Array | None = None  # float32 [n, 7] augmentation parameters (`tasks.augment`)


class EpisodeIndices(NamedTuple):
    """The index part of an episode (what a manifest stores); `FewShotSampler.gather` reads it."""

    support: ImageRefs
    query: ImageRefs
    unlabeled: ImageRefs | None


def _normalizer(normalize: str | tuple, ds: ImageDataset) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) per channel such that x = uint8 * scale + shift."""
    ch = ds.image_shape[-1]
    if isinstance(normalize, (tuple, list)):
        if len(normalize) != 2:
            raise ValueError(f"normalize=(mean, std) expected, got {normalize!r}")
        mean = np.broadcast_to(np.asarray(normalize[0], np.float64), (ch,))
        std = np.broadcast_to(np.asarray(normalize[1], np.float64), (ch,))
        if np.any(std <= 0):
            raise ValueError(f"normalize std must be > 0, got {normalize[1]!r}")
        return (1 / (255 * std)).astype(np.float32), (-mean / std).astype(np.float32)
    if normalize == "standard":
        valid = np.arange(ds.images.shape[1])[None, :] < ds.counts[:, None]
        px = ds.images[valid].reshape(-1, ch).astype(np.float64) / 255
        mean = px.mean(0) if len(px) else np.zeros(ch)
        std = np.maximum(px.std(0), 1e-6) if len(px) else np.ones(ch)
        return _normalizer((mean, std), ds)
    table = {"unit": (1 / 255, 0.0), "centered": (2 / 255, -1.0), "invert": (-1 / 255, 1.0),
             "none": (1.0, 0.0)}
    if normalize not in table:
        raise ValueError(f"unknown normalize={normalize!r}; use one of {NORMALIZE} or a "
                         "(mean, std) pair applied to pixels in [0, 1]")
    a, b = table[normalize]
    return np.full(ch, a, np.float32), np.full(ch, b, np.float32)


def _packed_order(key: Array, valid: Array, pos_bits: int) -> Array:
    """Positions along the last axis in random order, valid ones first: one int32 sort of keys
    packing random high bits above the position (several times faster on CPU than a key/value
    sort such as `jax.random.permutation`'s). Ties between random parts keep position order."""
    size = valid.shape[-1]
    rand_bits = 31 - pos_bits
    r = (jax.random.bits(key, valid.shape, jnp.uint32) >> (32 - rand_bits)).astype(jnp.int32)
    packed = jnp.where(valid, (r << pos_bits) | jnp.arange(size, dtype=jnp.int32),
                       jnp.iinfo(jnp.int32).max)
    return jnp.sort(packed, axis=-1) & ((1 << pos_bits) - 1)


def _pos_bits(n: int) -> int:
    return max(1, (n - 1).bit_length())


def random_permutation(key: Array, n: int) -> Array:
    """A uniformly random permutation of range(n) (int32) by packed-key sorts; as in jax, enough
    independent rounds are composed that ties between random keys are negligible."""
    rand_bits = 31 - _pos_bits(n)
    if rand_bits < 8:
        return jax.random.permutation(key, n).astype(jnp.int32)
    rounds = max(1, math.ceil(3 * math.log2(max(n, 2)) / rand_bits))
    perm = jnp.arange(n, dtype=jnp.int32)
    for k in jax.random.split(key, rounds):
        perm = perm[_packed_order(k, jnp.ones(n, bool), _pos_bits(n))]
    return perm


def _random_subset(key: Array, n: int, valid: Array) -> Array:
    """`n` distinct indices (in random order) among the True entries of `valid` (last axis)."""
    bits = _pos_bits(valid.shape[-1])
    if 31 - bits >= 24:  # ties between 24-bit random keys are negligible
        return _packed_order(key, valid, bits)[..., :n]
    u = jax.random.uniform(key, valid.shape)
    return jax.lax.top_k(jnp.where(valid, u, -1.0), n)[1].astype(jnp.int32)


@jax.tree_util.register_pytree_node_class
class FewShotSampler(TaskSampler):
    """N-way (`ways`), K-shot (`shots`), Q-query episodes from an `ImageDataset`.

    Options: `unlabeled` extra images per class (semi-supervised learners), `rotations` (each
    class rotated by 90/180/270 degrees is a new class: 4x the classes), `normalize` ('unit':
    [0, 1], 'centered': [-1, 1], 'invert': 1 - x/255 (ink bright for Omniglot), 'standard':
    dataset mean/std per channel, 'none': 0..255, or a (mean, std) pair on [0, 1] pixels),
    `random_rotation` (each class of an episode turned by a random multiple of 90 degrees, all
    its images alike: a per-class augmentation, the HyperTransformer scripts'
    `--random_rotate_by_90 --per_label_augmentation`; the classes stay the dataset's),
    `shuffle` (random order within the support and query sets), `within_group` (each episode's
    classes from one group, e.g. an alphabet, chosen with probability proportional to its
    classes or, with `group_weighting="uniform"`, uniformly; groups with fewer than `ways`
    classes are never chosen), `augment` (a `tasks.augment.Augment`: random affine
    distortions per image or per class, their parameters part of the episode's indices so
    they follow from its key). The uint8 images go to the device once, as rows
    [classes * examples, H*W*C] (with rotations: the four rotated copies, 4x the memory,
    instead of a per-pixel gather every episode). The sampler is a pytree (the images are a
    leaf), so `jax.jit(f)(sampler, key)` does not embed the images as constants.
    """

    def __init__(self, dataset: ImageDataset, ways: int, shots: int, queries: int,
                 unlabeled: int = 0, rotations: bool = False,
                 normalize: str | tuple = "unit", shuffle: bool = True,
                 within_group: bool = False, group_weighting: str = "classes",
                 augment: Augment | None = None, random_rotation: bool = False,
                 _device: tuple[Array, Array] | None = None):
        for f, v, lo in (("ways", ways, 1), ("shots", shots, 1), ("queries", queries, 1),
                         ("unlabeled", unlabeled, 0)):
            if int(v) != v or v < lo:
                raise ValueError(f"FewShotSampler: {f} must be an integer >= {lo}, got {v!r}")
        self.dataset, self.ways, self.shots = dataset, int(ways), int(shots)
        self.queries, self.unlabeled = int(queries), int(unlabeled)
        self.rotations, self.shuffle = bool(rotations), bool(shuffle)
        self.random_rotation = bool(random_rotation)
        if self.rotations and self.random_rotation:
            raise ValueError("FewShotSampler: rotations=True (rotations are new classes) and "
                             "random_rotation=True (a random rotation per class) exclude each "
                             "other; choose one")
        self.normalize = tuple(normalize) if isinstance(normalize, list) else normalize
        self.within_group, self.group_weighting = bool(within_group), group_weighting
        if augment is not None and not isinstance(augment, Augment):
            raise TypeError(f"FewShotSampler: augment must be a tasks.augment.Augment or None, "
                            f"got {type(augment).__name__}; e.g. Augment(per_class=True)")
        self.augment = augment
        _check_request(dataset, ways, shots + queries + unlabeled, self.rotations,
                       (shots, queries, unlabeled))
        h, w, _ = dataset.image_shape
        if (self.rotations or self.random_rotation) and h != w:
            flag = "rotations" if self.rotations else "random_rotation"
            off = setting(flag, "task.rotations", "false") if self.rotations else \
                ("--set task.rotations=none" if in_cli() else "random_rotation=False")
            raise ValueError(f"{flag}=True needs square images, got {h}x{w}; resize the dataset "
                             f"({setting('image_size', 'data.image_size', '28')}) or use {off}")
        self._scale, self._shift = _normalizer(self.normalize, dataset)
        self._groups = _group_table(dataset, self.ways, self.rotations, group_weighting) \
            if self.within_group else None
        if _device is None:
            _device = (jnp.asarray(_rows(dataset.images, self._rotated_rows)),
                       jnp.asarray(dataset.counts))
        self._rows, self._counts = _device

    # ----- pytree: the device arrays are leaves, the configuration is static
    def tree_flatten(self) -> tuple[tuple[Array, Array], tuple]:
        """Leaves: the device images and counts; aux: everything else."""
        aux = (_Ref(self.dataset), self.ways, self.shots, self.queries, self.unlabeled,
               self.rotations, self.normalize, self.shuffle, self.within_group,
               self.group_weighting, self.augment, self.random_rotation)
        return (self._rows, self._counts), aux

    @classmethod
    def tree_unflatten(cls, aux: tuple, leaves: tuple[Array, Array]) -> FewShotSampler:
        """Rebuild without re-validating or re-uploading."""
        obj = cls.__new__(cls)
        ref, obj.ways, obj.shots, obj.queries, obj.unlabeled, obj.rotations, obj.normalize, \
            obj.shuffle, obj.within_group, obj.group_weighting, obj.augment, \
            obj.random_rotation = aux
        obj.dataset = ref.obj
        obj._rows, obj._counts = leaves
        obj._scale, obj._shift = _normalizer(obj.normalize, obj.dataset)
        obj._groups = _group_table(obj.dataset, obj.ways, obj.rotations, obj.group_weighting) \
            if obj.within_group else None
        return obj

    # ----- configuration
    @property
    def num_classes(self) -> int:
        """Classes episodes are drawn from (x4 with rotations)."""
        return self.dataset.num_classes * (4 if self.rotations else 1)

    @property
    def _rotated_rows(self) -> bool:
        """Whether the device rows hold the four rotated copies of every image."""
        return self.rotations or self.random_rotation

    def replace(self, dataset: ImageDataset | None = None, **changes: Any) -> FewShotSampler:
        """A copy with some settings changed: any argument of the constructor (`ways`, `shots`,
        `queries`, `unlabeled`, `within_group`, `augment`, ...); on the same dataset and
        rotations the device images are shared, not uploaded again."""
        names = ("ways", "shots", "queries", "unlabeled", "rotations", "normalize", "shuffle",
                 "within_group", "group_weighting", "augment", "random_rotation")
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise TypeError(f"FewShotSampler.replace: unknown settings {unknown}; use {names}")
        kw = {n: changes.get(n, getattr(self, n)) for n in names}
        rotated = kw["rotations"] or kw["random_rotation"]
        same = (dataset is None or dataset is self.dataset) and rotated == self._rotated_rows
        return FewShotSampler(self.dataset if dataset is None else dataset, **kw,
                              _device=(self._rows, self._counts) if same else None)

    def with_ways_shots(self, ways: int | None = None, shots: int | None = None,
                        queries: int | None = None, unlabeled: int | None = None
                        ) -> FewShotSampler:
        """The same data and preprocessing with other N/K/Q (e.g. for evaluation)."""
        return self.replace(**_given(ways=ways, shots=shots, queries=queries,
                                     unlabeled=unlabeled))

    def with_dataset(self, dataset: ImageDataset, ways: int | None = None,
                     shots: int | None = None, queries: int | None = None,
                     unlabeled: int | None = None) -> FewShotSampler:
        """The same episode settings on another dataset (e.g. the test split); `ways`, `shots`,
        `queries`, `unlabeled` (None keeps this sampler's) change N/K/Q as `with_ways_shots`."""
        return self.replace(dataset, **_given(ways=ways, shots=shots, queries=queries,
                                              unlabeled=unlabeled))

    def setting_tag(self) -> str:
        """The episode setting in a file name: `5way_1shot_15query[_2unlabeled][_within_group]`."""
        return (f"{self.ways}way_{self.shots}shot_{self.queries}query"
                + (f"_{self.unlabeled}unlabeled" if self.unlabeled else "")
                + ("_within_group" if self.within_group else ""))

    def for_dataset(self, spec: str | Path, on_error: str = "raise",
                    **settings: Any) -> tuple[FewShotSampler, dict]:
        """These episode settings (with `settings` changed) on the dataset `spec`, read by
        `tasks.load_dataset` at this sampler's image size and channels; and what a result
        records of the dataset (spec, file-safe name, classes, examples, image shape)."""
        from metalearn.tasks.data.formats import load_dataset

        h, w, ch = self.dataset.image_shape
        ds = load_dataset(spec, image_size=(h, w), channels=ch, on_error=on_error)
        ways = settings.get("ways", self.ways)
        per = {k: settings.get(k, getattr(self, k)) for k in ("shots", "queries", "unlabeled")}
        n_rot = 4 if self.rotations else 1
        if ways > ds.num_classes * n_rot:
            rot = f" x 4 rotations = {ds.num_classes * 4}" if n_rot > 1 else ""
            given = "" if "ways" in settings else " (the sampler's own setting)"
            raise ValueError(f"dataset {str(spec)!r} has {ds.num_classes} classes{rot}, fewer "
                             f"than the {ways} ways of an episode{given}; evaluate with fewer "
                             f"ways: {option('ways', ds.num_classes * n_rot)}")
        need = sum(per.values())
        if ds.num_classes and int(ds.counts.min()) < need:
            small = int(np.argmin(ds.counts))
            enough = int((ds.counts >= need).sum())
            parts = " + ".join(f"{per[k]} {k}" for k in per if per[k] or k != "unlabeled")
            raise ValueError(f"dataset {str(spec)!r}: episodes need {parts} = {need} images per "
                             f"class, but class {ds.class_names[small]!r} has only "
                             f"{int(ds.counts[small])} ({enough} of {ds.num_classes} classes "
                             f"have {need} or more); evaluate with fewer images per class "
                             f"({option('shots', 'K')}, {option('queries', 'Q')}) or leave out "
                             "the small classes")
        try:
            sampler = self.replace(ds, **settings)
        except ValueError as e:
            raise ValueError(f"dataset {str(spec)!r}: {e}") from None
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", ds.name).strip("._-") or "dataset"
        info = {"spec": str(spec), "name": name, "classes": ds.num_classes,
                "examples": ds.num_examples, "image_shape": [h, w, ch]}
        return sampler, info

    def describe(self) -> dict:
        """JSON-able settings and the dataset summary (saved with runs)."""
        norm = [np.asarray(v).tolist() for v in self.normalize] \
            if isinstance(self.normalize, tuple) else self.normalize
        return {"sampler": type(self).__name__, "ways": self.ways, "shots": self.shots,
                "queries": self.queries, "unlabeled": self.unlabeled,
                "rotations": self.rotations, "random_rotation": self.random_rotation,
                "normalize": norm, "shuffle": self.shuffle,
                "within_group": self.within_group,
                **({"group_weighting": self.group_weighting,
                    "groups_eligible": self._groups.eligible} if self.within_group else {}),
                "augment": dataclasses.asdict(self.augment) if self.augment else None,
                "classes": self.num_classes, "dataset": self.dataset.describe()}

    def spec(self) -> dict | None:
        """How `metalearn.specs.rebuild` makes this sampler again (a run's config.json records
        it): its settings and its dataset's loader call; None when the dataset was made in
        memory and cannot be read again."""
        from metalearn.specs import class_path, object_spec

        data = self.dataset.spec()
        if data is None:
            return None
        names = ("ways", "shots", "queries", "unlabeled", "rotations", "normalize", "shuffle",
                 "within_group", "group_weighting", "augment", "random_rotation")
        return {"type": class_path(self),
                "fields": {"dataset": data, **{n: object_spec(getattr(self, n)) for n in names}}}

    # ----- sampling
    def sample_indices(self, key: Array) -> EpisodeIndices:
        """Which classes, examples and rotations (and distortions) make up the episode for
        `key` (pure)."""
        k_cls, k_ex, k_s, k_q, k_u = jax.random.split(key, 5)
        n_base = self.dataset.num_classes
        allowed = jnp.ones(self.num_classes, bool)
        if self._groups is not None:  # one group (alphabet) per episode
            g = jax.random.categorical(jax.random.fold_in(k_cls, 1), self._groups.logits)
            allowed = jnp.asarray(self._groups.of_class) == g
        chosen = _random_subset(k_cls, self.ways, allowed)
        base = chosen % n_base
        rot = chosen // n_base
        if self.random_rotation:
            rot = jax.random.randint(jax.random.fold_in(k_cls, 2), (self.ways,), 0, 4)
        per_class = self.shots + self.queries + self.unlabeled
        m = self.dataset.images.shape[1]
        valid = jnp.arange(m)[None, :] < self._counts[base][:, None]
        ex = _random_subset(k_ex, per_class, valid)  # [ways, per_class] distinct per class

        aug = self.augment
        k_aug = jax.random.fold_in(key, 1) if aug is not None else None
        class_affine = _augment.sample_params(k_aug, self.ways, aug) \
            if aug is not None and aug.per_class else None

        def refs(k: Array, lo: int, n: int, which: int) -> ImageRefs:
            pos = jnp.arange(self.ways * n, dtype=jnp.int32)
            if self.shuffle:
                pos = random_permutation(k, self.ways * n)
            c, j = pos // n, pos % n
            affine = None
            if class_affine is not None:
                affine = class_affine[c]
            elif aug is not None:
                affine = _augment.sample_params(jax.random.fold_in(k_aug, 1 + which),
                                                self.ways * n, aug)
            return ImageRefs(base[c], ex[c, lo + j], rot[c], c, affine)

        return EpisodeIndices(
            refs(k_s, 0, self.shots, 0), refs(k_q, self.shots, self.queries, 1),
            refs(k_u, self.shots + self.queries, self.unlabeled, 2) if self.unlabeled else None)

    def batch_indices(self, keys: Array) -> EpisodeIndices:
        """`sample_indices` of every key (compiled once per sampler configuration)."""
        return _batch_indices(self, keys)

    def normalize_images(self, images: Array) -> Array:
        """uint8 [..., H, W, C] -> float32 with this sampler's normalisation."""
        return jnp.asarray(images).astype(jnp.float32) * self._scale + self._shift

    def gather(self, idx: EpisodeIndices) -> Episode:
        """The episode named by `idx` (from `sample_indices` or a manifest)."""
        return self._assemble(idx, [self._flat_images(r) for r in _sets(idx)])

    def _assemble(self, idx: EpisodeIndices, flat: list[Array]) -> Episode:
        """The episode from its image rows (`_flat_images` of each set of `idx`)."""
        shape = self.dataset.image_shape
        x = [f.reshape(*r.cls.shape, *shape) if r.affine is None else
             _augment.warp(f.reshape(-1, *shape), r.affine.reshape(-1, r.affine.shape[-1]))
             .reshape(*r.cls.shape, *shape)
             for f, r in zip(flat, _sets(idx), strict=True)]
        return Episode(x[0], idx.support.label, x[1], idx.query.label,
                       x[2] if idx.unlabeled is not None else None)

    def _flat_images(self, r: ImageRefs) -> Array:
        """float32 [..., H*W*C]: the images `r` names, as normalised rows."""
        c, m = self.dataset.num_classes, self.dataset.images.shape[1]
        rows = (r.rotation * c + r.cls) * m + r.example if self._rotated_rows \
            else r.cls * m + r.example
        x = self._rows.at[rows].get(mode="promise_in_bounds")
        # whole uint8 rows first, then the float conversion: without the barrier XLA fuses them
        # into one loop that gathers each float separately (on CPU, batches of 32 20-way
        # 1-shot 15-query episodes: 3.8 vs 2.5 ms in `batch_sampler`, 12.3 vs 7.6 under jit)
        x = jax.lax.optimization_barrier(x)
        pixels = x.shape[-1] // len(self._scale)  # channels are the minor axis of a row
        return x.astype(jnp.float32) * jnp.tile(self._scale, pixels) + \
            jnp.tile(self._shift, pixels)

    def draw(self, key: Array) -> Episode:
        """`sample(key)`, compiled (the images are an argument of the program)."""
        return _jit_sample(self, key)

    def sample(self, key: Array) -> Episode:
        """One episode: support [N*K, H, W, C], labels [N*K] in [0, N), query [N*Q, ...]."""
        return self.gather(self.sample_indices(key))

    def sample_batch(self, key: Array, batch_size: int) -> Episode:
        """`batch_size` episodes (the same as vmapping `sample`; one gather for the batch)."""
        return self.gather(self.batch_indices(jax.random.split(key, batch_size)))

    def batch_sampler(self, batch_size: int) -> Callable[[Array], Episode]:
        """`key -> sample_batch(key, batch_size)`, compiled, for sampling outside a training step
        (data pipelines, evaluation); the episodes are identical. On CPU it uses XLA's loop
        emitters and writes whole image rows (see `_gather_apart`), faster than
        `jax.jit(sample_batch)` (`benchmarks/sampling.py` measures both)."""
        compiled = _compiled_batch(batch_size)
        return lambda key: compiled(self, key)

    def plot(self, key: Array, path: str | Path, max_per_row: int = 20) -> Path:
        """`plot_episode` of the episode for `key`, titled with this sampler's settings (its
        group when `within_group`, its augmentation) and each label's class name."""
        from metalearn.tasks.plotting import plot_episode

        idx = jax.tree.map(lambda a: a[0], self.batch_indices(key[None]))  # compiled, not eager
        s = jax.device_get(idx.support)
        names = {int(y): self.dataset.class_names[int(c)] + (f" {90 * int(r)}°" if r else "")
                 for y, c, r in zip(s.label, s.cls, s.rotation, strict=True)}
        groups = sorted({self.dataset.groups[int(c)] for c in s.cls})
        title = (f"{self.ways}-way {self.shots}-shot, {self.queries} queries per class; "
                 + (f"within {groups[0]}" if self.within_group else
                    f"classes from {len(groups)} groups"))
        if self.augment is not None:
            title += f"; affine augmentation per {'class' if self.augment.per_class else 'image'}"
        return plot_episode(jax.jit(FewShotSampler.gather)(self, idx), path, max_per_row, title,
                            [names[y] for y in range(self.ways)])

    # ----- fixed episodes (metalearn.tasks.data.manifest)
    def export_manifest(self, path: str | Path, key: Array, num_episodes: int) -> Path:
        """Write `num_episodes` sampled episodes (those of `sample_batch(key, n)`) as JSON/CSV."""
        return export_manifest(self, path, key, num_episodes)

    def episodes_from_manifest(self, path: str | Path) -> Episode:
        """Episodes listed in a manifest (batched: leading axis = episodes), preprocessed as in
        training (`metalearn.tasks.data.manifest.manifest_episodes`)."""
        return manifest_episodes(self, path)


CPU_SAMPLING_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


@jax.jit
def _jit_sample(sampler: TaskSampler, key: Array) -> Episode:
    return sampler.sample(key)


@functools.cache
def _sampling_compiler_options() -> dict | None:
    """CPU_SAMPLING_OPTIONS on CPU if this XLA accepts them, else None."""
    if jax.default_backend() != "cpu":
        return None
    try:
        jax.jit(jnp.negative, compiler_options=CPU_SAMPLING_OPTIONS).lower(1.0).compile()
    except Exception:  # noqa: BLE001 - an XLA without the option: keep its defaults
        return None
    return CPU_SAMPLING_OPTIONS


def _given(**kw: Any) -> dict:
    """The keyword arguments that are not None."""
    return {k: v for k, v in kw.items() if v is not None}


class _GroupTable(NamedTuple):
    """Within-group episodes: the group of each class and log-weights of the groups."""

    of_class: np.ndarray  # int32 [classes (x4 with rotations)]: group index
    logits: np.ndarray  # float32 [groups]: log P(group); -inf for groups with < ways classes
    eligible: dict  # group name -> classes, of the groups episodes are drawn from


def _group_table(ds: ImageDataset, ways: int, rotations: bool, weighting: str) -> _GroupTable:
    """Which groups can hold a `ways`-way episode, and how likely each is chosen."""
    if weighting not in GROUP_WEIGHTING:
        raise ValueError(f"group_weighting={weighting!r}: use classes (a group is chosen with "
                         "probability proportional to its classes) or uniform")
    names, of_base = np.unique(ds.groups, return_inverse=True)
    reps = 4 if rotations else 1
    sizes = np.bincount(of_base, minlength=len(names)) * reps
    ok = sizes >= ways
    if not ok.any():
        big = int(np.argmax(sizes))
        raise ValueError(
            f"within_group: no group of {ds.name!r} has {ways} classes (the largest, "
            f"{str(names[big])!r}, has {sizes[big]}{' with rotations' if rotations else ''}); "
            f"use at most {sizes[big]} ways, or draw each episode's classes across groups")
    w = np.where(ok, sizes if weighting == "classes" else 1, 0).astype(np.float64)
    with np.errstate(divide="ignore"):
        logits = np.log(w / w.sum()).astype(np.float32)
    return _GroupTable(np.tile(of_base, reps).astype(np.int32), logits,
                       {str(n): int(k) for n, k in zip(names, sizes, strict=True) if k >= ways})


def _sets(idx: EpisodeIndices) -> list[ImageRefs]:
    return [r for r in (idx.support, idx.query, idx.unlabeled) if r is not None]


def _gather_apart(s: FewShotSampler, idx: EpisodeIndices) -> Episode:
    """`s.gather(idx)` with the image rows computed as their own XLA computation (for CPU with
    `CPU_SAMPLING_OPTIONS`). Fused with the reshape to [..., H, W, 1], XLA's CPU loops run over
    rows of W pixels instead of whole images (3.4 vs 1.3-1.5 ms for a batch of 32 20-way 1-shot
    15-query episodes); the branch of a conditional on a runtime predicate (always true) keeps
    the reshape out of its loops."""
    make = lambda: [s._flat_images(r) for r in _sets(idx)]
    zeros = lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(make))
    return s._assemble(idx, jax.lax.cond(s._counts[0] > 0, make, zeros))


@functools.cache
def _compiled_batch(batch_size: int) -> Callable:
    opts = _sampling_compiler_options()
    gather = _gather_apart if opts else lambda s, idx: s.gather(idx)
    return jax.jit(lambda s, key: gather(s, s.batch_indices(jax.random.split(key, batch_size))),
                   compiler_options=opts)


@jax.jit
def _batch_indices(sampler: FewShotSampler, keys: Array) -> EpisodeIndices:
    return jax.vmap(sampler.sample_indices)(keys)


def _rows(images: np.ndarray, rotations: bool) -> np.ndarray:
    """[classes * examples, H*W*C] rows to gather from (x4: rotations 0, 90, 180, 270 degrees).

    Gathering whole rows is several times faster on CPU than gathering [class, example] pairs,
    and precomputed rotations cost memory (4x) instead of a per-pixel gather each episode."""
    c, m = images.shape[:2]
    rots = [np.rot90(images, k, axes=(2, 3)) for k in range(4)] if rotations else [images]
    return np.concatenate([r.reshape(c * m, -1) for r in rots])


class _Ref:
    """Identity-compared holder (pytree aux data must be hashable and cheap to compare)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Ref) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)


def _check_request(ds: ImageDataset, ways: int, per_class: int, rotations: bool,
                   kqu: tuple[int, int, int]) -> None:
    """Impossible episode requests fail here, saying what the split has."""
    if ds.num_classes == 0:
        raise ValueError(f"dataset {ds.name!r} has no classes (empty split?); check the split "
                         "fractions or the class lists the split was built from")
    n = ds.num_classes * (4 if rotations else 1)
    if ways > n:
        rot = f" ({ds.num_classes} x 4 rotations)" if rotations else ""
        raise ValueError(f"ways={ways} but dataset {ds.name!r} has only {n} classes{rot}; "
                         f"use {setting('ways', 'task.ways', str(n))}" + (
                             "" if rotations else " or rotations as classes "
                             f"({setting('rotations', 'task.rotations', 'true')})"))
    small = int(np.argmin(ds.counts))
    have = int(ds.counts[small])
    if per_class > have:
        k, q, u = kqu
        parts = f"shots + queries{' + unlabeled' if u else ''} = {k} + {q}" + \
            (f" + {u}" if u else "")
        raise ValueError(f"{parts} = {per_class} examples per class needed, but class "
                         f"{ds.class_names[small]!r} of {ds.name!r} has only {have} (examples "
                         f"per class: {int(ds.counts.min())} to {int(ds.counts.max())}); lower "
                         f"shots/queries ({setting('shots', 'task.shots')} / "
                         f"{setting('queries', 'task.queries')})" + (
                             "" if in_cli() else " or drop small classes with "
                             f"dataset.filter_min_examples({per_class})"))
