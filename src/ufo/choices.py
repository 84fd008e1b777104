"""The fixed sets of values that `ufo` options take, as Enums, so that typer lists them in --help,
checks them and completes them in the shell. The library's own lists stay the truth: the CLI tests
check that each Enum here equals the list it names (and these imports stay light: no torch)."""

from __future__ import annotations

from enum import Enum


class LatencyBackend(str, Enum):  # ufo.search.latency.BACKENDS
    torch_cpu = "torch-cpu"
    ort_cpu = "ort-cpu"
    cuda = "cuda"


class ServeBackend(str, Enum):  # ufo.deploy.server.Backend
    torch = "torch"
    onnx = "onnx"


class ExportFormat(str, Enum):
    onnx = "onnx"


class Int8(str, Enum):  # ufo.deploy.onnx_export.Int8Mode
    dynamic = "dynamic"
    static = "static"


class OnError(str, Enum):  # ufo.data.readers.OnError
    raise_ = "raise"
    skip = "skip"


class Stage(str, Enum):  # ufo.run.STAGE_NAMES, in order
    all_in_one = "all_in_one"
    task_supernet = "task_supernet"
    chip_supernet = "chip_supernet"
    predictors = "predictors"
    search = "search"
    extract = "extract"
    export = "export"
    report = "report"


class Suite(str, Enum):  # ufo.demo.SUITES
    builtin = "builtin"
    full = "full"


class ExtendTrain(str, Enum):  # ufo.train.extend.MODES
    head = "head"
    head_expert = "head+expert"
    head_expert_norms = "head+expert+norms"
    all = "all"


class Device(str, Enum):  # ufo.config.TrainConfig.device, ufo.train.tune.TuneRecipe.device
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Amp(str, Enum):  # ufo.config.TrainConfig.amp, ufo.train.tune.TuneRecipe.amp
    none = "none"
    bf16 = "bf16"


def device_value(choice: Device, option: str = "--device") -> str:
    """The library's device string for a `--device` choice. Asking for cuda where torch sees no CUDA
    device is refused here, with the option's name, before the command loads anything."""
    if choice is Device.cuda:
        import torch

        if not torch.cuda.is_available():
            from ufo.errors import ConfigError

            raise ConfigError(
                f"{option} cuda: CUDA is not available (torch sees no CUDA device); use {option} auto or cpu"
            )
    return choice.value


def value(choice: Enum | None) -> str | None:
    """The string a library call takes for a choice (None stays None)."""
    return None if choice is None else choice.value
