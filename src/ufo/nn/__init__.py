"""Elastic building blocks, the SuperViT supernet and exact extraction."""

from ufo.nn.extract import MultiTaskViT, build_extracted, extract
from ufo.nn.vit import SuperViT

__all__ = ["SuperViT", "MultiTaskViT", "extract", "build_extracted"]
