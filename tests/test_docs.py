"""The documentation site builds with ``mkdocs build --strict`` (issue #14).

Why in the test suite: strict mode fails on a broken link or anchor, a page left out of the
navigation, and any warning of the API reference (mkdocstrings reads the docstrings of the
public modules statically, with griffe, so a renamed function or a broken cross-reference in a
docstring breaks the build here rather than on the published site). Needs the ``docs`` extra
(in ``requirements.lock``); about 10 s on two cores.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_the_site_builds_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install '.[docs]'")
    pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra is not installed")
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    # the API reference really rendered the public entry points (not an empty page)
    for page, name in (("session", "connect"), ("client", "Client"), ("sampler", "QAllocSampler"),
                       ("jobs", "JobSpec"), ("config", "Settings"), ("exceptions", "QAllocError"),
                       ("api", "create_app")):
        html = (site / "reference" / page / "index.html").read_text()
        assert f'id="ray_qalloc.{page}' in html and name in html, (page, name)
    assert (site / "openapi.json").is_file()   # the HTTP API page links the committed schema


def test_every_runnable_benchmark_has_its_command_and_figures_page() -> None:
    """A new benchmark module appears on the benchmarks page with the command that runs it."""
    page = (DOCS / "benchmarks.md").read_text()
    for module in sorted((ROOT / "benchmarks").glob("*.py")):
        if 'if __name__ == "__main__"' in module.read_text():
            assert f"python -m benchmarks.{module.stem}" in page, f"docs/benchmarks.md lacks benchmarks.{module.stem}"
    assert "2 cores" in page and "no GPU" in page   # the machine every figure was measured on


def test_readme_points_to_the_site() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "mkdocs" in readme and re.search(r"docs/(index|benchmarks)\.md", readme)
