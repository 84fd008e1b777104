"""Deployment: standalone task models, ONNX / INT8 export with parity checks, and an HTTP server."""

from ufo.deploy.hf import load, save_pretrained
from ufo.deploy.package import (
    DeployError,
    Preprocessing,
    TaskModel,
    extract_task_model,
    load_task_model,
    open_task_model,
    save_task_model,
)
from ufo.deploy.predict import Prediction

__all__ = [
    "DeployError",
    "Prediction",
    "Preprocessing",
    "TaskModel",
    "extract_task_model",
    "load",
    "load_task_model",
    "open_task_model",
    "save_pretrained",
    "save_task_model",
]
