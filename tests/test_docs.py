"""The docs stay true: the config reference is generated from today's models, the API walkthrough
runs, relative links resolve, and the README starts with the two commands."""

from __future__ import annotations

import re
from pathlib import Path

from ufo import config_docs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_config_reference_is_up_to_date():
    assert (DOCS / "config.md").read_text() == config_docs.render(), (
        "docs/config.md is out of date: run `python -m ufo.config_docs`"
    )
    assert config_docs.main(["--check"]) == 0


def test_config_reference_covers_every_section_and_describes_every_key():
    text = config_docs.render()
    for model in ("Config", "TrainConfig", "PipelineConfig", "SearchBudget", "ExportStageConfig", "DataConfig"):
        assert f"## {model}\n" in text, model
    blank = [line for line in text.splitlines() if line.startswith("| `") and line.endswith("|  |")]
    assert not blank, f"keys without a meaning (comment them in config.py or add to NOTES): {blank}"


def test_api_walkthrough_runs_in_under_30_lines(tmp_path, monkeypatch):
    text = (DOCS / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    code = blocks[0]
    assert len(code.strip().splitlines()) < 30
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(DOCS / "api.md"), "exec"), {})
    assert (tmp_path / "digits.safetensors").is_file() and (tmp_path / "digits.onnx").is_file()


def test_relative_links_resolve():
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert first.strip().splitlines() == ["make demo", "make test"]
