"""The docs' numbers cannot drift: every rendered block equals what its reports hold, every report folder is cited
and records where it came from, and the README's first screen stays short."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def render():
    spec = importlib.util.spec_from_file_location("docs_render", REPO / "docs" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report_folders() -> list[Path]:
    return sorted(p for p in (REPO / "docs").iterdir() if p.is_dir() and (p.name.startswith("eval-")
                                                                          or p.name == "selection-val"))


def test_every_rendered_block_matches_its_reports(render) -> None:
    """`python docs/render.py --check`: a number typed over, or a report regenerated without re-rendering, fails."""
    assert render.render(check=True, root=REPO) == {}, "run: python docs/render.py"
    assert render.main(["--check"]) == 0


def test_a_changed_digit_in_the_verdict_table_is_caught(render) -> None:
    """The planted failure: one digit of the README's verdict table changed by hand."""
    readme = REPO / "README.md"
    text = readme.read_text()
    block = render.MARKER.search(text)
    assert block is not None and block["name"] == "verdicts" and "|" in block["body"]
    start = block.start("body")
    i = next(start + k for k, ch in enumerate(block["body"]) if ch.isdigit() and block["body"][k - 1] == ".")
    planted = text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:]
    R = render.Reports(REPO / "docs")
    page = render.Page(readme, REPO / "docs")
    assert render.render_text(text, page, R)[1] == []  # the planted pass: the committed text is unchanged
    assert render.render_text(planted, page, R)[1] == ["verdicts"]


def test_unknown_blocks_and_missing_reports_are_errors(render, tmp_path) -> None:
    page = render.Page(tmp_path / "x.md", tmp_path)
    with pytest.raises(KeyError, match="unknown block 'nope'"):
        render.render_text("<!-- render: nope -->\n<!-- /render -->\n", page, render.Reports(tmp_path))
    with pytest.raises(FileNotFoundError, match="cited but does not exist"):
        render.Reports(tmp_path).json("eval-absent")


def test_every_report_folder_is_cited_and_every_cited_one_exists() -> None:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    text = "\n".join(p.read_text() for p in pages)
    cited = set(re.findall(r"(?:docs/)?((?:eval-[\w-]+)|selection-val)/", text))
    folders = {p.name for p in _report_folders()}
    assert folders - cited == set(), "report folders no page cites: delete them or cite them"
    assert cited - folders == set(), "pages cite report folders that do not exist"


@pytest.mark.parametrize("folder", _report_folders(), ids=lambda p: p.name)
def test_every_report_folder_records_its_command_config_and_commit(folder: Path) -> None:
    metrics = folder / "metrics.json"
    prov = json.loads(metrics.read_text()).get("provenance") if metrics.is_file() else None
    if prov is None:
        prov = json.loads((folder / "provenance.json").read_text())
    assert set(prov) >= {"command", "config", "commit"}
    assert prov["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", prov["commit"])
    assert prov["command"] is None or prov["command"].startswith("python")


def test_the_readme_says_what_the_toolkit_is_in_120_words_then_the_two_commands() -> None:
    text = (REPO / "README.md").read_text()
    first = text.split("\n\n")[1]
    assert len(first.split()) <= 120
    quick = text.index("## Quick start")
    assert text.index("pip install -r requirements.txt && python lsft_inference.py") > quick
    assert text.index("python -m pytest") > quick
    assert "<!-- render: verdicts -->" in text
    for term in ("spatial feature transform", "LSFT", "GSFT"):
        assert term in text
