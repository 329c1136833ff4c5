"""Datasets, their formats and downloads, and how they are split among clients."""

from fedmutual.data.cifar import load_cifar, read_cifar_batch
from fedmutual.data.datasets import (
    DATASETS,
    ArrayDataset,
    cache_dir,
    candidate_dirs,
    from_arrays,
    load_dataset,
    register_dataset,
)
from fedmutual.data.download import DOWNLOADS, download_dataset
from fedmutual.data.idx import load_idx_pair, read_idx, write_idx
from fedmutual.data.partition import (
    PARTITIONS,
    check_partition,
    format_label_table,
    label_table,
    parse_partition,
    partition,
    read_indices,
    register_partition,
    stratified_subset,
    validation_splits,
)

__all__ = [
    "ArrayDataset",
    "DATASETS",
    "DOWNLOADS",
    "PARTITIONS",
    "cache_dir",
    "candidate_dirs",
    "check_partition",
    "download_dataset",
    "format_label_table",
    "from_arrays",
    "label_table",
    "load_cifar",
    "load_dataset",
    "load_idx_pair",
    "parse_partition",
    "partition",
    "read_cifar_batch",
    "read_indices",
    "register_dataset",
    "register_partition",
    "read_idx",
    "stratified_subset",
    "validation_splits",
    "write_idx",
]
