"""The wheel (issue #14, packaging): what ``pip install ray-qalloc`` gets.

Builds the wheel from a copy of the sources (never in the work tree: an in-tree build writes
``build/`` and egg-info there), reads its metadata and file list, installs it with
``--no-deps`` into a throwaway venv that borrows this environment's dependencies through a
``.pth`` file, and imports every module of the *installed* package in a fresh interpreter
(``-I``: not the checkout) to see that none pulls an optional extra's package.

Why every module and not only ``import ray_qalloc``: the top-level import is lazy, so it
proves little; a module of the core that imports Cirq or stix2 at its top would break a
plain install the first time it is used. Modules that exist *for* an extra are listed in
``EXTRA_MODULES`` with their extra. About 15–25 s on two cores, most of it importing Ray and
Qiskit; the build needs setuptools ≥ 77, from this environment or, isolated, from the index.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

EXTRAS = {"braket", "cirq", "gpu", "siem", "docs"}
# top-level packages that only extras (or the test tools) bring
OPTIONAL_PACKAGES = frozenset({"cirq", "braket", "qiskit_braket_provider", "stix2", "stix2patterns", "cuquantum",
                               "cupy", "pynvml", "mkdocs", "mkdocstrings", "griffe", "schemathesis", "hypothesis",
                               "pytest", "selenium"})
# modules that exist for an extra and may import its package when imported
EXTRA_MODULES = {"ray_qalloc.frontends.cirq": "cirq"}


def _setuptools_major() -> int:
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return 0


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "ray_qalloc", src / "ray_qalloc",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--wheel-dir", str(out), str(src)]
    if _setuptools_major() >= 77:   # pyproject's build requirement is here: build offline
        cmd.insert(4, "--no-build-isolation")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and ("No matching distribution found for setuptools" in proc.stdout + proc.stderr):
        pytest.skip("cannot build: setuptools>=77 is neither installed here nor reachable on the index")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (built,) = out.glob("ray_qalloc-*.whl")
    return built


def test_wheel_metadata_lists_the_extras_and_ships_the_package_data(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = z.read(meta_name).decode()
        entry_points = z.read(meta_name.replace("METADATA", "entry_points.txt")).decode()
    provides = {line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Provides-Extra:")}
    assert EXTRAS <= provides, provides
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    for extra, dist in (("cirq", "cirq-core"), ("braket", "amazon-braket-sdk"), ("siem", "stix2"),
                        ("gpu", "cuquantum-python-cu12"), ("docs", "mkdocs")):
        assert any(dist in r and f'extra == "{extra}"' in r for r in requires), (extra, dist)
    core = [r for r in requires if "extra ==" not in r]
    assert not any(d in r for r in core for d in ("cirq", "braket", "stix2", "cuquantum", "mkdocs")), core
    # package data: the shipped cost model (a placement without it falls back to the prior) and the dashboard
    artifacts = {n.rsplit("/", 1)[1] for n in names if n.startswith("ray_qalloc/costmodel/artifacts/")}
    assert {"runtime.ubj", "memory.ubj", "meta.json"} <= artifacts, sorted(artifacts)
    assert "ray_qalloc/web/dashboard.html" in names
    assert "qalloc = ray_qalloc.cli:app" in entry_points
    assert not any(n.startswith(("tests/", "benchmarks/", "docs/")) for n in names)   # only the package


_PROBE = textwrap.dedent("""
    import importlib, json, pkgutil, sys
    from importlib import resources
    import ray_qalloc
    optional, extra_modules = set(json.loads(sys.argv[1])), json.loads(sys.argv[2])
    loaded = lambda: {n.split(".")[0] for n in sys.modules} & optional
    report = {"file": ray_qalloc.__file__, "after_top_level": sorted(loaded()), "pulled": {}, "failed": {}}
    for info in pkgutil.walk_packages(ray_qalloc.__path__, "ray_qalloc."):
        if info.name in extra_modules:
            continue
        before = loaded()
        try:
            importlib.import_module(info.name)
        except Exception as exc:
            report["failed"][info.name] = repr(exc)[:300]
            continue
        if loaded() - before:
            report["pulled"][info.name] = sorted(loaded() - before)
    report["dashboard"] = (resources.files("ray_qalloc.web") / "dashboard.html").is_file()
    report["artifacts"] = sorted(p.name for p in resources.files("ray_qalloc.costmodel").joinpath("artifacts").iterdir())
    print("PROBE " + json.dumps(report))
""")


def test_installed_wheel_imports_without_the_extras(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                           "--no-index", "--quiet", str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies come from this environment (appended after the venv's own site-packages,
    # whose ray_qalloc is the installed wheel; this environment's editable install is not activated)
    Path(purelib, "_qalloc_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "QALLOC_"))}
    proc = subprocess.run([str(python), "-I", "-c", _PROBE, json.dumps(sorted(OPTIONAL_PACKAGES)),
                           json.dumps(EXTRA_MODULES)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(line[len("PROBE "):])
    assert report["file"].startswith(purelib), report["file"]          # the wheel, not the checkout
    assert report["after_top_level"] == [], report["after_top_level"]
    assert report["failed"] == {}, report["failed"]                    # every module imports from the wheel
    assert report["pulled"] == {}, f"core modules import an optional extra's package: {report['pulled']}"
    assert report["dashboard"] and report["artifacts"], report
