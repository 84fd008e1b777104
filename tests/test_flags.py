"""Quality flags (`ufo.flags`): a metric predictor that ranks subnets poorly and an INT8 model slower
than FP32 are flagged, in the search result, the export rows and the run report."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline_helpers import tiny_run
from ufo.flags import LOW_PREDICTOR_TAU, int8_flag, predictor_flag
from ufo.report import write_report


def test_predictor_flag_fires_below_the_threshold_only():
    assert predictor_flag("mnist", LOW_PREDICTOR_TAU, 20) is None
    assert predictor_flag("mnist", 0.9, 20) is None
    assert predictor_flag("mnist", None, 5) is None  # too few subnets to cross-validate: nothing to judge
    msg = predictor_flag("mnist", 0.21, 20)
    assert msg is not None and "mnist" in msg and "0.21" in msg and "20 subnets" in msg and "--metric-samples" in msg


def test_int8_flag_fires_when_int8_is_slower():
    assert int8_flag("digits", 1.0, 0.6) is None
    assert int8_flag("digits", 1.0, 1.0) is None
    assert int8_flag("digits", 1.0, None) is None  # no INT8 export
    msg = int8_flag("digits", 0.5, 0.8)
    assert msg is not None and "0.800 vs 0.500 ms" in msg and "slower than FP32" in msg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.getbasetemp() / "tiny-shared")


def test_search_and_export_carry_their_flags_and_the_report_lists_them(run, tmp_path):
    search = json.loads((run / "search" / "search.json").read_text())
    export = json.loads((run / "export" / "export.json").read_text())
    for t, r in search.items():  # the stage's rows always say, even when there is nothing to flag
        assert isinstance(r["warnings"], list)
        assert isinstance(export[t]["warnings"], list)
        lat = export[t]["latency_ms"]
        assert (int8_flag(t, lat["onnx_fp32"], lat.get("onnx_int8")) is not None) == bool(export[t]["warnings"])
    # A copy of the run whose figures deserve both flags: the report lists them first.
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("*.onnx", "tb"))
    t = next(iter(search))
    search[t]["warnings"] = [predictor_flag(t, 0.1, 12)]
    export[t]["warnings"] = [int8_flag(t, 0.2, 0.3)]
    (copy / "search" / "search.json").write_text(json.dumps(search).replace(str(run), str(copy)))  # its own plots
    (copy / "export" / "export.json").write_text(json.dumps(export))
    html, md = write_report(copy)
    text = md.read_text()
    assert "## Warnings" in text and text.index("## Warnings") < text.index("## Metrics per task")
    assert "Kendall tau 0.10" in text and "INT8 model is slower than FP32 (0.300 vs 0.200 ms" in text
    assert 'class="warn"' in html.read_text()
    _, md = write_report(run)
    assert ("## Warnings" in md.read_text()) == any(r["warnings"] for r in [*search.values(), *export.values()])
