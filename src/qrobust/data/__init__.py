"""Datasets behind a name registry: uint8 images in memory, float32 [0, 1] batches out.

>>> from qrobust.data import load_dataset, BatchLoader
>>> ds = load_dataset("digits", "test")
>>> len(ds), ds.info.input_shape
(359, (1, 8, 8))
>>> x, y = next(iter(BatchLoader(ds, 32)))
>>> x.shape, x.dtype, float(x.max()) <= 1.0
(torch.Size([32, 1, 8, 8]), torch.float32, True)
"""

from qrobust.data import transforms
from qrobust.data.cache import default_cache_dir
from qrobust.data.dataset import ArrayDataset, DatasetInfo
from qrobust.data.loader import BatchLoader, BatchView
from qrobust.data.registry import available_datasets, data_dirs, dataset_info, load_dataset

__all__ = [
    "ArrayDataset",
    "BatchLoader",
    "BatchView",
    "DatasetInfo",
    "available_datasets",
    "data_dirs",
    "dataset_info",
    "default_cache_dir",
    "load_dataset",
    "transforms",
]
