"""Elastic building blocks, the SuperViT supernet and exact extraction."""

from ufo.nn.extract import MultiTaskViT, build_extracted, extract
from ufo.nn.vit import Layout, SuperViT

__all__ = ["Layout", "MultiTaskViT", "SuperViT", "build_extracted", "extract"]
