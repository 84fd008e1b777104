"""Deployment: standalone task models, ONNX / INT8 export with parity checks, and an HTTP server."""

from ufo.deploy.package import (DeployError, Preprocessing, TaskModel, extract_task_model, load_task_model,
                                open_task_model, save_task_model)

__all__ = ["DeployError", "Preprocessing", "TaskModel", "extract_task_model", "load_task_model", "open_task_model",
           "save_task_model"]
