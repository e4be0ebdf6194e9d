"""Data I/O for the samplers: the `ImageDataset` type, readers of image folders, zips, IDX and
TFDS files, the decoded-dataset cache, class splits, the Omniglot protocols and episode
manifests. The samplers in `metalearn.tasks` draw episodes from what these modules load; the
public names are re-exported there (`metalearn.tasks.load_dataset`, ...)."""
