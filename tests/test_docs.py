"""The README is the front door: short, its test command is what CI runs,
and every page it links exists."""
from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def test_readme_is_short():
    assert len(_read("README.md").splitlines()) <= 150


def test_ci_runs_the_readmes_test_command():
    readme = _read("README.md")
    section = readme[readme.index("## Test"):]
    command = re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()
    assert "ruff check ." in command and "pytest" in command
    ci_lines = [line.strip() for line in _read(".ci", "run").splitlines()]
    assert command in ci_lines


def test_local_links_resolve():
    for page in ["README.md"] + [os.path.join("docs", p) for p in os.listdir(
            os.path.join(ROOT, "docs")) if p.endswith(".md")]:
        folder = os.path.dirname(os.path.join(ROOT, page))
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", _read(page)):
            assert os.path.exists(os.path.join(folder, target)), f"{page} links {target}"
