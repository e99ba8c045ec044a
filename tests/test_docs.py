"""README.md and docs/: short README, pages behind it, every relative link and #anchor resolves,
and the results tables equal what benchmarks/report.py makes of benchmarks/results/*.json."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _report():  # noqa: ANN202 (the module)
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prose(text: str) -> list[str]:
    """The page's lines outside fenced code blocks, with inline code removed."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return lines


def anchors(text: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, -1, -2 ...
    for repeats."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6} +(.*?) *#*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_readme_is_short_with_pages_behind_it() -> None:
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 250
    subjects = {"training", "sampling", "weights", "reliability", "scaling", "accelerators",
                "performance", "api"}  # fmt: skip
    assert subjects <= {p.stem for p in PAGES[1:]}


def test_anchors_follow_github() -> None:
    text = "# A `b` c's (d)\n## Weights & Biases\n```\n# not a heading\n```\n## x\n## x\n"
    assert anchors(text) == {"a-b-cs-d", "weights--biases", "x", "x-1"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for line in _prose(page.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{target} (no file {dest.relative_to(ROOT)})")
            elif anchor and anchor not in anchors(dest.read_text(encoding="utf-8")):
                broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{page.name}: {broken}"


def test_links_are_checked() -> None:
    # The link test sees links: a page with a broken one would be caught.
    text = "see [a](docs/nowhere.md) and `[b](x.md)`\n```\n[c](y.md)\n```\n"
    assert [t for line in _prose(text) for t in LINK.findall(line)] == ["docs/nowhere.md"]


def test_tables_equal_the_results_json() -> None:
    report = _report()
    used = set()
    for page in report.pages(ROOT):
        text = page.read_text(encoding="utf-8")
        used |= {m.group("name") for m in report.BLOCK.finditer(text)}
        assert report.render(text) == text, f"{page.name}: run python benchmarks/report.py"
    assert used == set(report.BLOCKS)  # every table appears somewhere


def test_tables_come_from_the_json(tmp_path: Path) -> None:
    report = _report()
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    page = "<!-- begin report:train-step -->\nstale\n<!-- end report:train-step -->\n"
    d = json.loads((results / "train_step.json").read_text())
    first = d["configs"][0]["results"][0]
    first.update(step_s_median=0.523, step_s_min=0.518, step_s_max=0.570)
    d.pop("date", None)
    (results / "train_step.json").write_text(json.dumps(d))
    before = report.render(page, results)
    assert "523 ms (518-570)" in before and "Date: not recorded" in before
    d["configs"][0]["results"][0]["step_s_median"] = 0.25
    d["date"] = "2026-12-01 10:00 UTC"
    (results / "train_step.json").write_text(json.dumps(d))
    after = report.render(page, results)
    assert "250 ms (518-570)" in after and "Date: 2026-12-01 10:00 UTC" in after
    # A field the file lacks is said to be missing, never made up.
    mesh = report.render("<!-- begin report:mesh -->\n<!-- end report:mesh -->", results)
    assert "vector extensions: not recorded" in mesh
