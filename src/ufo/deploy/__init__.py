"""Deployment: ONNX / INT8 export with parity checks, an HTTP server, `TaskModel.predict`, and
Hugging Face style folders. The task model file itself is `ufo.taskmodel`."""

from ufo.deploy.hf import load, save_pretrained
from ufo.deploy.predict import Prediction

__all__ = ["Prediction", "load", "save_pretrained"]
