"""`ufo report`: self-contained HTML (every image inline) and Markdown of a `ufo run` folder, and
the page rendered by headless Chromium with every image decoded."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline_helpers import tiny_run
from ufo.cli import app
from ufo.report import ReportError, write_report

# routing map, metric vs params, a Pareto front per task, a training figure per training stage,
# an evaluation figure per task (digits: confusion matrix, mnist: Recall@K)
IMAGES = 1 + 1 + 2 + 3 + 2

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# records, once the page has loaded, each image's decoded width (0: not decoded) into the DOM
PROBE = (
    "<script>window.addEventListener('load',()=>{const d=document.createElement('pre');d.id='ufo-probe';"
    "d.textContent=JSON.stringify([...document.images].map(i=>i.complete?i.naturalWidth:-1));"
    "document.body.appendChild(d);});</script>"
)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.getbasetemp() / "tiny-shared")


def test_html_is_self_contained_and_md_has_every_section(run):
    html, md = write_report(run)
    page = html.read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == IMAGES
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    from PIL import Image

    for s in srcs:  # every inline image decodes to a real figure
        img = Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1])))
        img.load()
        assert img.format == "PNG" and min(img.size) > 100, img.size
    assert "href=" not in page and "<link" not in page  # nothing outside the file
    assert "<details><summary>config.yaml</summary><pre>name: tiny-run" in page
    text = md.read_text()
    for needle in (
        "## Metrics per task",
        "| digits | classification | top1 |",
        "## Training curves",
        "all_in_one: loss against step, validation primary metric against step",
        "## Routing map",
        "## Metric vs parameters",
        "## Pareto fronts",
        "## Task evaluation",
        "digits: confusion matrix",
        "mnist: Recall@K",
        "extracted task model on the test split",
        "## Exported models",
        "ufo serve ",
        "ufo export ",
        "--int8 static",
        "extract/digits.arch.json",
        "## Provenance",
        "Seed: 0",
        "### Config",
        "```yaml",
    ):
        assert needle in text, needle
    assert all(
        f"| {who} | " in _provenance(text) for who in ("all_in_one", "task_supernet", "chip_supernet", "this report")
    )
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(refs) == IMAGES
    for ref in refs:  # Markdown images point at the stage files and the report's own figures
        assert (md.parent / ref).is_file(), ref
    curves = json.loads((run / "report" / "curves.json").read_text())["tasks"]
    assert curves["digits"]["figure"] == "confusion_matrix" and curves["mnist"]["figure"] == "recall_at_k"
    # the final evaluation the figures come from is the extract stage's
    extracted = json.loads((run / "extract" / "extract.json").read_text())
    assert curves["digits"]["metrics"]["top1"] == pytest.approx(extracted["digits"]["metrics"]["top1"])
    exported = json.loads((run / "export" / "export.json").read_text())
    assert all(Path(e["fp32"]).name in text for e in exported.values())


def _provenance(md: str) -> str:
    """The provenance table of a report.md."""
    return md.split("## Provenance", 1)[1].split("### Config", 1)[0]


def test_task_curves_are_kept_until_a_model_changes(run, monkeypatch):
    import ufo.report_figures as rf

    def no_second_time(*a, **k):
        raise AssertionError("the cached curves were computed again")

    monkeypatch.setattr(rf, "compute_curves", no_second_time)
    write_report(run)  # the cache in report/curves.json still matches the extracted models
    model = run / "extract" / "digits.safetensors"
    os.utime(model, ns=(model.stat().st_atime_ns, model.stat().st_mtime_ns + 1))  # "a new model"
    with pytest.raises(AssertionError, match="computed again"):
        write_report(run)


def test_report_names_stages_that_have_not_run(run, tmp_path):
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(run / "config.yaml", part / "config.yaml")
    shutil.copytree(run / "all_in_one", part / "all_in_one", ignore=shutil.ignore_patterns("*.safetensors", "tb"))
    _, md = write_report(part)
    text = md.read_text()
    assert "(stage not run)" in text and "| search | not run |" in text and "## Routing map" not in text
    assert "all_in_one: loss against step, validation" in text and "task_supernet: loss" not in text
    assert "## Task evaluation\n\nno trained model in the run folder yet" in text
    prov = _provenance(text)  # the stages that are there, and the report's
    assert "| all_in_one | " in prov and "| this report | " in prov and "| chip_supernet | " not in prov
    with pytest.raises(ReportError, match="not a `ufo run` folder"):
        write_report(tmp_path / "nothing")


def test_cli_report(run):
    res = CliRunner().invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    assert "index.html" in res.output


def test_page_renders_in_headless_chromium_with_every_image(run, tmp_path):
    if CHROMIUM is None:
        msg = "chromium is not installed (apt-get install chromium); the report's rendering is not checked"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + " (CI=true, so this is an error)")
        pytest.skip(msg)
    html, _ = write_report(run)
    page = tmp_path / "probe.html"
    page.write_text(html.read_text().replace("</body>", PROBE + "</body>"))
    res = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r'<pre id="ufo-probe">([^<]*)</pre>', res.stdout)
    assert m, "the page did not finish loading: " + res.stdout[-500:]
    widths = json.loads(m.group(1))
    assert len(widths) == IMAGES and all(w > 100 for w in widths), widths
    assert "Metrics per task" in res.stdout
