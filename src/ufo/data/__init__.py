"""Data: in-memory image sets, readers for common layouts, built-in dataset recipes, splits per
task kind and batch transforms. (`MixedTaskSampler` lives in `ufo.data.sampler`.)"""

from ufo.data.dataset import ImageSet, cache_info, clear_cache, concat
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
from ufo.data.splits import split_by_class, split_by_identity, split_by_sample, split_query_gallery
from ufo.data.transforms import DEFAULT_MEAN, DEFAULT_STD, BatchTransform, build_transform

__all__ = [
    "DEFAULT_MEAN",
    "DEFAULT_STD",
    "IMAGE_EXTENSIONS",
    "RECIPES",
    "BatchTransform",
    "ImageSet",
    "build_transform",
    "cache_info",
    "clear_cache",
    "concat",
    "default_data_root",
    "list_recipes",
    "load_oneshot_runs",
    "load_recipe",
    "read_alphadigits_mat",
    "read_csv_manifest",
    "read_gtsrb",
    "read_image_folder",
    "read_npz",
    "read_zip_images",
    "split_by_class",
    "split_by_identity",
    "split_by_sample",
    "split_query_gallery",
]
