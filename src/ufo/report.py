"""`ufo report RUN_DIR`: one page about a `ufo run` folder, as RUN_DIR/report/index.html (self-
contained: every image inline as a base64 data URI) and RUN_DIR/report/report.md.

It reads what the stages wrote (each stage's metrics.json / search.json / extract.json /
export.json and done.json) and shows, for every stage that has run: the per-task metrics table
(single-task baselines, All in One, task supernet, chip supernet, the chosen subnet, its ONNX
and INT8 exports), each training stage's loss and validation curves, the routing map, the
metric-vs-parameters plot of inherited subnets, each task's Pareto front with the chosen subnet
marked, each task's evaluation figure on the test split (confusion matrix, ROC, CMC or Recall@K;
`ufo.report_figures`), the exported models (size, latency, parity), the commands that serve or
export them, and the run's provenance (versions, seed, hardware, git commit, the config). Stages
that have not run are named as missing. Figures drawn here are written to RUN_DIR/report/ too,
which the Markdown links to.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any

import yaml

from ufo.checkpoint import atomic_write_text
from ufo.errors import UFOError
from ufo.runlock import locks
from ufo.tasks import TaskData, task_class

STAGE_ORDER = ("all_in_one", "task_supernet", "chip_supernet", "predictors", "search", "extract", "export", "report")


class ReportError(UFOError):
    """A folder that is not a `ufo run` folder."""


def _json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path} is not valid JSON ({e}); run that stage again with `ufo run --from`") from None


def load_run(run_dir: Path) -> dict[str, Any]:
    """Everything the report shows, read from the stage folders (None for stages not run)."""
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise ReportError(f"{run_dir} is not a `ufo run` folder: {cfg_file} is missing")
    try:
        cfg = yaml.safe_load(cfg_file.read_text())
    except yaml.YAMLError as e:
        raise ReportError(f"{cfg_file} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("tasks"), dict):
        raise ReportError(f"{cfg_file} is not a ufo config (no `tasks:` mapping)")
    return {
        "cfg": cfg,
        "done": {s: _json(run_dir / s / "done.json") for s in STAGE_ORDER},
        "all_in_one": _json(run_dir / "all_in_one" / "metrics.json"),
        "task_supernet": _json(run_dir / "task_supernet" / "metrics.json"),
        "chip_supernet": _json(run_dir / "chip_supernet" / "metrics.json"),
        "predictors": _json(run_dir / "predictors" / "predictors.json"),
        "search": _json(run_dir / "search" / "search.json"),
        "extract": _json(run_dir / "extract" / "extract.json"),
        "export": _json(run_dir / "export" / "export.json"),
    }


def _f(v: Any, digits: int = 4) -> str:
    return "–" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def metrics_table(run: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Rows of (task, kind, metric, then the primary metric after each stage)."""
    cfg = run["cfg"]
    aio, ts, chip, ext, exp = (
        run[k] or {} for k in ("all_in_one", "task_supernet", "chip_supernet", "extract", "export")
    )
    base = aio.get("baselines") or {}
    cols = (
        ["task", "kind", "metric"]
        + (["alone"] if base else [])
        + [
            "All in One",
            "task supernet",
            "chip supernet (largest)",
            "chosen subnet",
            "its model's params",
            "ONNX fp32",
            "INT8",
        ]
    )
    rows = []
    for t, tc in cfg["tasks"].items():
        e = exp.get(t) or {}
        key = task_class(tc["kind"]).primary
        row = [t, tc["kind"], key] + ([_f((base.get(t) or {}).get("primary"))] if base else [])
        row += [
            _f((aio.get("primary") or {}).get(t)),
            _f((ts.get("primary") or {}).get(t)),
            _f((chip.get("primary") or {}).get(t)),
            _f((ext.get(t) or {}).get("primary")),
            f"{ext[t]['params']:,}" if t in ext else "–",
            _f((e.get("metrics_fp32") or {}).get(key)),
            _f((e.get("metrics_int8") or {}).get(key)),
        ]
        rows.append(row)
    return cols, rows


def export_table(run: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    cols = [
        "task",
        "ONNX file",
        "size (KB)",
        "INT8 size (KB)",
        "torch ms",
        "ONNX ms",
        "INT8 ms",
        "parity: max abs diff",
        "INT8: max abs diff",
    ]
    rows = []
    for t, e in (run["export"] or {}).items():
        lat = e.get("latency_ms") or {}
        rows.append(
            [
                t,
                e["fp32"],
                f"{e['fp32_bytes'] / 1024:.0f}",
                f"{e['int8_bytes'] / 1024:.0f}" if "int8_bytes" in e else "–",
                _f(lat.get("torch"), 3),
                _f(lat.get("onnx_fp32"), 3),
                _f(lat.get("onnx_int8"), 3),
                f"{e['parity_max_abs_diff']:.1e}",
                f"{e['int8_max_abs_diff']:.2g}" if "int8_max_abs_diff" in e else "–",
            ]
        )
    return cols, rows


def _budget_terms(r: dict[str, Any]) -> list[str]:
    """A search's budget as `name <= value` terms. A latency budget is the one the chosen subnet
    was judged against: a relative budget (`latency_fraction`) is timed again beside every
    measurement, so the value from when the search started may differ under a changing load."""
    judged = r.get("budget_ms")
    terms = []
    for k, v in (r.get("budget") or {}).items():
        name = k.removeprefix("max_")
        if name == "latency_ms" and judged is not None:
            terms.append(f"latency_ms <= {judged:.3g} (timed beside the chosen subnet)")
        else:
            terms.append(f"{name} <= {v:g}")
    return terms


def search_table(run: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per task: the budget, the chosen subnet (predicted vs measured), and the predictors' CV quality."""
    cols = [
        "task",
        "budget",
        "chosen params",
        "MFLOPs",
        "predicted metric",
        "measured metric",
        "predicted ms",
        "measured ms",
        "metric GP tau (CV)",
        "latency GP tau / MAPE (CV)",
    ]
    rows = []
    for t, r in (run["search"] or {}).items():
        p = (run["predictors"] or {}).get(t) or {}
        m, lat = p.get("metric") or {}, p.get("latency") or {}
        budget = ", ".join(_budget_terms(r))
        rows.append(
            [
                t,
                budget,
                f"{r['params']:,}",
                f"{r['flops'] / 1e6:.2f}",
                _f(r.get("predicted_metric")),
                _f(r.get("measured_metric")),
                _f(r.get("predicted_latency_ms"), 3),
                _f(r.get("measured_latency_ms"), 3),
                _f(m.get("cv_kendall_tau"), 2),
                f"{lat['cv_kendall_tau']:.2f} / {100 * lat['cv_mape']:.1f}%" if lat.get("cv_mape") is not None else "–",
            ]
        )
    return cols, rows


def warnings(run: dict[str, Any]) -> list[str]:
    """The run's quality flags (`ufo.flags`): poorly ranking metric predictors from the search
    stage, INT8 models slower than FP32 from the export stage."""
    out: list[str] = []
    for stage in ("search", "export"):
        for r in (run[stage] or {}).values():
            out += (r or {}).get("warnings") or []
    return out


def stage_table(run: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = [
        [s, "done" if d else "not run", f"{d['seconds']:.0f}" if d else "–", d["finished"] if d else "–"]
        for s, d in run["done"].items()
        if s != "report"
    ]
    return ["stage", "state", "seconds", "finished (UTC)"], rows


def commands(run_dir: Path, run: dict[str, Any]) -> list[str]:
    """Shell commands that serve and export the run's task models."""
    ext, exp = run["extract"] or {}, run["export"] or {}
    if not ext:
        return []
    r = lambda p: str(run_dir / p)
    lines = [
        "# serve every task model on http://127.0.0.1:8000 (torch)",
        "ufo serve " + " ".join(r(v["file"]) for v in ext.values()),
    ]
    if exp:
        lines += [
            "# the same from the ONNX exports",
            "ufo serve " + " ".join(r(v.get("int8") or v["fp32"]) for v in exp.values()) + " --backend onnx",
        ]
    t, v = next(iter(ext.items()))
    lines += [
        f"# export a task model again (here {t}) with static INT8 calibrated on its training images",
        f"ufo export {r(v['file'])} --format onnx --int8 static --out {t}.onnx",
        "# cut the same subnet out of the chip supernet yourself (the heads' BatchNorm statistics as trained;",
        "# the pipeline re-estimates them for the subnet first, ufo.evaluation.protocol.recalibrate_bn)",
        f"ufo extract {r('chip_supernet')} --task {t} --arch {r(v['arch_file'])} --out {t}.safetensors"
        if "arch_file" in v
        else f"ufo extract {r('chip_supernet')} --task {t} --arch smallest --out {t}.safetensors",
    ]
    return lines


def provenance_table(run_dir: Path) -> tuple[list[str], list[list[str]]]:
    """Versions, machine and commit of each training stage (its provenance.json, written when it
    started) and of this report."""
    from ufo.provenance import provenance

    cols = ["written by", "ufo", "torch", "timm", "python", "CPU", "cores", "GPU", "git commit", "time (UTC)"]
    found = [(s, _json(run_dir / s / "provenance.json")) for s in STAGE_ORDER]
    rows = []
    for who, p in [*((s, p) for s, p in found if p), ("this report", provenance())]:
        v, h = p.get("versions") or {}, p.get("hardware") or {}
        rows.append(
            [
                who,
                *(str(v.get(k, "–")) for k in ("ufo", "torch", "timm", "python")),
                str(h.get("cpu", "–")),
                str(h.get("cores", "–")),
                ", ".join(h.get("gpus") or []) or "none",
                _short_commit(p.get("git_commit")),
                str(p.get("time", "–")),
            ]
        )
    return cols, rows


def _short_commit(commit: str | None) -> str:
    if not commit:
        return "–"
    return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")


def images(run_dir: Path, run: dict[str, Any]) -> list[tuple[str, str, Path]]:
    """(section, caption, file) of every figure that exists."""
    out = []
    f = run_dir / "task_supernet" / "routing_map.png"
    if f.is_file():
        out.append(
            (
                "Routing map",
                "FFN path per task and block learned by the task supernet (router probability in each cell)",
                f,
            )
        )
    f = run_dir / "chip_supernet" / "metric_vs_params.png"
    if f.is_file():
        out.append(("Metric vs parameters", "inherited subnets of the chip supernet, no fine-tuning", f))
    for t, s in (run["search"] or {}).items():
        png = s.get("png") or s.get("png_path")
        if png:
            p = Path(png) if Path(png).is_absolute() else run_dir / png
            if not p.is_file():
                p = run_dir / "search" / t / Path(png).name
            if p.is_file():
                out.append(("Pareto fronts", f"{t}: predicted front, measured candidates, chosen subnet marked", p))
    return out


def _md_table(cols: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: c.replace("|", "\\|")
    return "\n".join(
        ["| " + " | ".join(map(esc, cols)) + " |", "|" + "---|" * len(cols)]
        + ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    )


def _html_table(cols: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    num = re.compile(r"^[-+0-9.,e–]+$")  # numbers right-aligned, text left-aligned
    body = "".join(
        "<tr>" + "".join(f"<td{'' if num.match(c) else ' class=t'}>{html.escape(c)}</td>" for c in r) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td.t,th{text-align:left}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}
pre{background:#f6f6f6;padding:1em;overflow-x:auto}figure{margin:1em 0}figcaption{font-size:13px;color:#555}
li.warn{color:#8a4b00}"""


@locks("run_dir", create=False)
def write_report(run_dir: str | Path, data: dict[str, TaskData] | None = None) -> tuple[Path, Path]:
    """Write RUN_DIR/report/index.html and report.md; returns both paths. The task evaluation
    figures score the final models on the tasks' test splits: `data` (each task's data, as `ufo run`
    holds it) or, when not given, the data the run's config names, read here."""
    from ufo.report_figures import curve_figures, training_figures

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    cfg = run["cfg"]
    out = run_dir / "report"
    title = f"UFO run {cfg.get('name', '')}: {len(cfg['tasks'])} tasks"
    kinds = ", ".join(f"{t} ({tc['kind']})" for t, tc in cfg["tasks"].items())
    intro = (
        f"Tasks: {kinds}. Primary metric of each "
        "task on its test split after each stage; 'chosen subnet' is the model the search picked under the "
        "task's budget, extracted as a plain timm ViT plus head."
    )
    sections = [
        ("Metrics per task", metrics_table(run)),
        ("Search under each task's budget", search_table(run)),
        ("Exported models", export_table(run)),
        ("Stages", stage_table(run)),
    ]
    task_figs, notes = curve_figures(run_dir, run, out, data)
    figs = training_figures(run_dir, out) + images(run_dir, run) + task_figs
    cmds = commands(run_dir, run)
    md = [f"# {title}", "", intro, ""]
    doc = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>"]
    flags = warnings(run)
    if flags:
        md += ["## Warnings", "", *[f"- {w}" for w in flags], ""]
        doc += [
            "<h2>Warnings</h2>",
            "<ul>" + "".join(f'<li class="warn">{html.escape(w)}</li>' for w in flags) + "</ul>",
        ]
    for name, (cols, rows) in sections[:3]:
        md += [f"## {name}", "", _md_table(cols, rows) if rows else "(stage not run)", ""]
        doc += [f"<h2>{name}</h2>", _html_table(cols, rows) if rows else "<p>(stage not run)</p>"]
    last = None
    for section, caption, f in figs:
        if section != last:
            md += [f"## {section}", ""]
            doc.append(f"<h2>{section}</h2>")
            last = section
        rel = f.relative_to(out) if f.parent == out else Path("..") / f.relative_to(run_dir)
        md += [f"![{caption}]({rel.as_posix()})", "", f"*{caption}*", ""]
        doc.append(
            f'<figure><img alt="{html.escape(caption)}" src="{_data_uri(f)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    if notes:
        md += ["## Task evaluation", "", *notes, ""] if last != "Task evaluation" else [*notes, ""]
        doc += (["<h2>Task evaluation</h2>"] if last != "Task evaluation" else []) + [
            f"<p>{html.escape(n)}</p>" for n in notes
        ]
    if cmds:
        md += ["## Serve or export", "", "```bash", *cmds, "```", ""]
        doc += ["<h2>Serve or export</h2>", f"<pre>{html.escape(chr(10).join(cmds))}</pre>"]
    name, (cols, rows) = sections[3]
    md += [f"## {name}", "", _md_table(cols, rows), ""]
    doc += [f"<h2>{name}</h2>", _html_table(cols, rows)]
    cols, rows = provenance_table(run_dir)
    config = yaml.safe_dump(cfg, sort_keys=False)
    seed = (
        f"Seed: {cfg.get('seed', '–')}. Each training stage's versions and machine (its provenance.json), "
        "then this report's."
    )
    md += [
        "## Provenance",
        "",
        seed,
        "",
        _md_table(cols, rows),
        "",
        "### Config",
        "",
        "```yaml",
        config.rstrip(),
        "```",
        "",
    ]
    doc += [
        "<h2>Provenance</h2>",
        f"<p>{html.escape(seed)}</p>",
        _html_table(cols, rows),
        f"<details><summary>config.yaml</summary><pre>{html.escape(config)}</pre></details>",
    ]
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body>\n" + "\n".join(doc) + "\n</body></html>\n"
    )
    atomic_write_text(out / "index.html", page)
    atomic_write_text(out / "report.md", "\n".join(md))
    return out / "index.html", out / "report.md"


def final_table(run_dir: str | Path) -> str:
    """The per-task metrics table as Markdown (what `ufo demo` prints at the end)."""
    cols, rows = metrics_table(load_run(Path(run_dir)))
    return _md_table(cols, rows)


def referenced_images(page: str) -> int:
    """How many inline images a report page holds."""
    return len(re.findall(r'<img [^>]*src="data:image/png;base64,', page))
