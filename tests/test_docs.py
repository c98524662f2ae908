"""The README is the front door: short, its test command is what CI runs,
and every page it links exists. The repository cites only the paper and itself."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

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


# Words that point outside the repository or at how the work was organised. The
# repository cites the paper (section, equation, table) or its own docs/ pages.
# "helper" alone is a legitimate word for functions (tests/helpers.py); only a
# helper with a letter ("helper C") refers to people.
OUTSIDE_REFERENCES = [
    re.compile(r"\bSPEC\b"),
    re.compile(r"\bSTYLE\b"),
    re.compile(r"\b[Hh]elpers? [A-Z]\b"),
    re.compile(r"\b[Ii]ssues? \d"),
    re.compile(r"\b[Ii]tems? \d"),
    re.compile(r"\bUNMEASURED\b"),
]
TEXT_SUFFIXES = (".py", ".md", ".yaml", ".sh", ".toml")


def _tracked_text_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    paths = [p for p in out.stdout.decode("utf-8").split("\0") if p]
    this = os.path.relpath(os.path.abspath(__file__), ROOT).replace(os.sep, "/")
    return [p for p in paths if p != this
            and (p.endswith(TEXT_SUFFIXES) or p.startswith(".ci/"))
            and os.path.isfile(os.path.join(ROOT, p))]


def test_no_outside_references():
    hits = []
    for path in _tracked_text_files():
        with open(os.path.join(ROOT, path), encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if any(p.search(line) for p in OUTSIDE_REFERENCES):
                    hits.append(f"{path}:{number}: {line.strip()}")
    assert not hits, "references outside the repository:\n" + "\n".join(hits)
