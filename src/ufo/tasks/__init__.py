"""Task kinds. Every module in this package is imported, so a new kind is one new file that
registers itself with `@register("kind")`."""

import importlib
import pkgutil

from ufo.tasks.base import TASK_KINDS, EmbeddingTask, Task, TaskData, register, task_class

for _m in pkgutil.iter_modules(__path__):
    if _m.name not in ("base", "metrics"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["TASK_KINDS", "EmbeddingTask", "Task", "TaskData", "register", "task_class"]
