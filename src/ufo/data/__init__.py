"""Data: image sets (in memory, or listed and decoded on demand), readers for common layouts and
tar shards, built-in dataset recipes, splits per task kind, transforms, and the loader that
streams them. (`MixedTaskSampler` lives in `ufo.data.sampler`.)"""

from ufo.data.dataset import ImageSet, cache_info, clear_cache, concat
from ufo.data.layouts import read_imagenet, read_lfw, read_market1501, read_sop
from ufo.data.loader import Feed, MixedLoader, iter_batches
from ufo.data.readers import (
    IMAGE_EXTENSIONS,
    read_alphadigits_mat,
    read_csv_manifest,
    read_gtsrb,
    read_image_folder,
    read_npz,
    read_zip_images,
)
from ufo.data.recipes import RECIPES, default_data_root, list_recipes, load_oneshot_runs, load_recipe
from ufo.data.shards import read_webdataset, write_shards
from ufo.data.splits import split_by_class, split_by_identity, split_by_sample, split_query_gallery
from ufo.data.transforms import DEFAULT_MEAN, DEFAULT_STD, BatchTransform, build_transform

__all__ = [
    "DEFAULT_MEAN",
    "DEFAULT_STD",
    "IMAGE_EXTENSIONS",
    "RECIPES",
    "BatchTransform",
    "Feed",
    "ImageSet",
    "MixedLoader",
    "build_transform",
    "cache_info",
    "clear_cache",
    "concat",
    "default_data_root",
    "iter_batches",
    "list_recipes",
    "load_oneshot_runs",
    "load_recipe",
    "read_alphadigits_mat",
    "read_csv_manifest",
    "read_gtsrb",
    "read_image_folder",
    "read_imagenet",
    "read_lfw",
    "read_market1501",
    "read_npz",
    "read_sop",
    "read_webdataset",
    "read_zip_images",
    "split_by_class",
    "split_by_identity",
    "split_by_sample",
    "split_query_gallery",
    "write_shards",
]
