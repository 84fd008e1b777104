"""`ufo report`: self-contained HTML (every image inline) and Markdown of a `ufo run` folder, and
the page rendered by headless Chromium with every image decoded."""

from __future__ import annotations

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

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# records, once the page has loaded, each image's decoded width (0: not decoded) into the DOM
PROBE = ("<script>window.addEventListener('load',()=>{const d=document.createElement('pre');d.id='ufo-probe';"
         "d.textContent=JSON.stringify([...document.images].map(i=>i.complete?i.naturalWidth:-1));"
         "document.body.appendChild(d);});</script>")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.getbasetemp() / "tiny-shared")


def test_html_is_self_contained_and_md_has_every_section(run):
    html, md = write_report(run)
    page = html.read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 4  # routing map, metric vs params, one Pareto front per task
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "href=" not in page and "<link" not in page  # nothing outside the file
    text = md.read_text()
    for needle in ("## Metrics per task", "| digits | classification | top1 |", "## Routing map",
                   "## Metric vs parameters", "## Pareto fronts", "## Exported models", "ufo serve ",
                   "ufo export ", "--int8 static", "extract/digits.arch.json"):
        assert needle in text, needle
    for ref in re.findall(r"\]\((\.\./[^)]+)\)", text):  # Markdown images point at the stage files
        assert (md.parent / ref).is_file(), ref
    exported = json.loads((run / "export" / "export.json").read_text())
    assert all(Path(e["fp32"]).name in text for e in exported.values())


def test_report_names_stages_that_have_not_run(run, tmp_path):
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(run / "config.yaml", part / "config.yaml")
    shutil.copytree(run / "all_in_one", part / "all_in_one", ignore=shutil.ignore_patterns("*.safetensors", "tb"))
    _, md = write_report(part)
    text = md.read_text()
    assert "(stage not run)" in text and "| search | not run |" in text and "## Routing map" not in text
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
    res = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r'<pre id="ufo-probe">([^<]*)</pre>', res.stdout)
    assert m, "the page did not finish loading: " + res.stdout[-500:]
    widths = json.loads(m.group(1))
    assert len(widths) == 4 and all(w > 100 for w in widths), widths
    assert "Metrics per task" in res.stdout
