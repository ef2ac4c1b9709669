"""Model registry: versioned cost-model artifacts on disk, and how the allocator finds them.

Why a directory of versions rather than one "current" file: training (``tune/``) and serving
(the allocator) run in different processes, possibly on different machines sharing a disk.
Each artifact is written whole into a hidden temporary directory and renamed into place, so a
reader sees complete artifacts only; versions sort by name (UTC timestamp first), so "newest"
needs no database. Incompatible or broken artifacts (another feature schema, a half-copied
file) are skipped with a log line, never loaded, and the allocator keeps a working predictor:
the newest compatible artifact from the registry, else the one packaged with ray-qalloc, else
the heuristic prior.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping

from ray_qalloc.costmodel.model import CostModel, IncompatibleArtifact, LearnedPredictor, check_compatible, read_meta
from ray_qalloc.costmodel.prior import HeuristicPrior

log = logging.getLogger(__name__)

#: Where a model trained on the reference sweep ships with the package (may be absent).
PACKAGED_DIR = Path(__file__).parent / "artifacts"


def new_version(data_hash: str | None = None) -> str:
    """Sortable id: UTC time to the microsecond, then a short hash of the data (or randomness)."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now % 1 * 1e6):06d}Z"
    tag = hashlib.sha256(f"{data_hash}{uuid.uuid4().hex}".encode()).hexdigest()[:8]
    return f"{stamp}-{tag}"


def save_artifact(registry_dir: Path | str, model: CostModel, *, metrics: Mapping[str, Any] | None = None,
                  data_hash: str | None = None) -> Path:
    """Write ``registry_dir/<version>/`` atomically (temporary directory, then rename)."""
    root = Path(registry_dir)
    root.mkdir(parents=True, exist_ok=True)
    version = new_version(data_hash)
    tmp = root / f".tmp-{version}-{uuid.uuid4().hex[:6]}"
    try:
        model.save(tmp, version=version, metrics=metrics, data_hash=data_hash)
        final = root / version
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("cost model artifact %s written (%s rows)", final, model.meta.get("n_rows"))
    return final


def _candidates(directory: Path) -> Iterator[Path]:
    """Artifact directories under ``directory``, newest first (or ``directory`` itself)."""
    if not directory.is_dir():
        return
    if (directory / "meta.json").exists():
        yield directory
        return
    names = sorted((e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith(".")),
                   reverse=True)
    for name in names:
        yield directory / name


def latest_artifact(registry_dir: Path | str | None) -> Path | None:
    """The newest artifact this code can load; broken or incompatible ones are skipped and logged."""
    if registry_dir is None:
        return None
    for path in _candidates(Path(registry_dir)):
        try:
            meta = read_meta(path)
            check_compatible(meta)
            if not (path / "runtime.ubj").exists():
                raise IncompatibleArtifact("no runtime.ubj")
        except IncompatibleArtifact as exc:
            log.warning("cost model artifact %s skipped: %s", path, exc)
            continue
        return path
    return None


def load_predictor(registry_dir: Path | str | None = None, **predictor_options: Any) -> Any:
    """LearnedPredictor from the newest compatible artifact (registry, then packaged), else the prior."""
    for root in (registry_dir, PACKAGED_DIR):
        path = latest_artifact(root)
        if path is None:
            continue
        try:
            return LearnedPredictor(CostModel.load(path), **predictor_options)
        except Exception as exc:  # checksum mismatch, corrupt booster: keep looking
            log.warning("cost model artifact %s could not be loaded: %s", path, exc)
    log.info("no cost model artifact found; using the heuristic prior")
    return HeuristicPrior()


class ArtifactWatcher:
    """Notices new artifacts so the allocator swaps models without a restart.

    ``poll`` is cheap when nothing changed: one ``stat`` of the registry directory (a rename
    into it changes its mtime) plus its listing; the artifact is read only when the newest
    compatible version differs from the one already served.
    """

    def __init__(self, registry_dir: Path | str, *, current: Path | None = None,
                 **predictor_options: Any) -> None:
        self.registry_dir = Path(registry_dir)
        self.current = current
        self.options = predictor_options
        self._stamp: tuple[int, tuple[str, ...]] | None = None

    def _snapshot(self) -> tuple[int, tuple[str, ...]] | None:
        try:
            st = self.registry_dir.stat()
            names = tuple(sorted(e.name for e in os.scandir(self.registry_dir) if not e.name.startswith(".")))
        except OSError:
            return None
        return st.st_mtime_ns, names

    def poll(self) -> Any | None:
        """A new LearnedPredictor when a newer compatible artifact appeared, else None."""
        stamp = self._snapshot()
        if stamp is None or stamp == self._stamp:
            return None
        self._stamp = stamp
        path = latest_artifact(self.registry_dir)
        if path is None or path == self.current:
            return None
        try:
            predictor = LearnedPredictor(CostModel.load(path), **self.options)
        except Exception as exc:
            log.warning("cost model artifact %s could not be loaded: %s", path, exc)
            return None
        self.current = path
        return predictor
