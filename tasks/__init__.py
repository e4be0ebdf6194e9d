"""Task samplers and datasets: few-shot image classification episodes and in-context regression.

    import jax
    from metalearn import tasks

    ds = tasks.load_omniglot()                    # ../shared/data/omniglot or $METALEARN_OMNIGLOT
    full = tasks.load_protocol("vinyals")         # the full Omniglot (1,623 characters)
    vinyals = tasks.protocol_split(full, "vinyals")   # 1028 / 172 / 423 characters
    splits = tasks.split_by_group(ds, {"train": 0.75, "test": 0.25}, seed=0)  # by alphabet
    tasks.save_split("run/split.json", splits)    # tasks.load_split(...) rebuilds it later
    train = tasks.FewShotSampler(splits["train"], ways=20, shots=1, queries=15, rotations=True)
    test = train.with_dataset(splits["test"])     # held-out alphabets, same settings
    tasks.plot_episode(test.sample(jax.random.PRNGKey(0)), "episode.png")
    mine = tasks.load_dataset("my_images/", image_size=28, channels=1)  # or IMAGES,LABELS or .npz
    batch = train.batch_sampler(32)(jax.random.PRNGKey(1))   # 32 episodes, compiled

Samplers are pure functions of a PRNG key (`sample`, `sample_batch`), so they also run inside
a jitted training step. In-context regression: `LinearRegression`, `SparseLinearRegression`,
`TeacherNetwork`, `Sinusoid`, their `.ood(...)` variants and `TaskPool` (a finite task pool).
"""
from metalearn.tasks.data.datasets import ImageDataset, concat, from_numpy
from metalearn.tasks.data.folders import load_image_folder, load_omniglot
from metalearn.tasks.data.formats import load_dataset, load_idx, load_tfds, read_idx, write_idx
from metalearn.tasks.data.manifest import read_manifest
from metalearn.tasks.data.omniglot import (
    PROTOCOLS,
    ht_split,
    lake_split,
    load_protocol,
    protocol_split,
)
from metalearn.tasks.data.splits import (
    load_split,
    save_split,
    split_by_class,
    split_by_group,
    split_by_source,
    vinyals_split,
)
from metalearn.tasks.fewshot import EpisodeIndices, FewShotSampler, ImageRefs
from metalearn.tasks.plotting import plot_episode
from metalearn.tasks.regression import (
    LinearRegression,
    RegressionTask,
    Sinusoid,
    SparseLinearRegression,
    TaskPool,
    TeacherNetwork,
)

__all__ = [
    "EpisodeIndices", "FewShotSampler", "ImageDataset", "ImageRefs", "LinearRegression",
    "PROTOCOLS", "RegressionTask", "Sinusoid", "SparseLinearRegression", "TaskPool",
    "TeacherNetwork", "concat", "from_numpy", "ht_split", "lake_split", "load_dataset",
    "load_idx", "load_image_folder", "load_omniglot", "load_protocol", "load_split",
    "load_tfds", "plot_episode", "protocol_split", "read_idx", "read_manifest", "save_split",
    "split_by_class", "split_by_group", "split_by_source", "vinyals_split", "write_idx",
]
