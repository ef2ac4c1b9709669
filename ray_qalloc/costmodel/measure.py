"""Ground truth, measured: run a sweep of circuits on every backend, under caps, into the run history.

Why this module exists: the cost model learns runtime per (circuit, backend) from the same
Parquet run history that live jobs append to. A sweep fills that history on purpose, with
circuits chosen to span a wide runtime range, so that a fresh install can train a model
before it has served a single job.

Why caps and censoring: a wrong simulation method costs 100-1000x and some runs never end
(NOTES: MPS ran QAOA-16 for 14 s and Grover-16 for 90+ s where a statevector took 0.04 s;
transpiling MQT's grover at 20+ qubits ate all 24 GiB). A sweep that runs everything blindly
never finishes. So every (case, backend) pair ends as exactly one history row:

* ``completed``          -- ran within the caps; ``wall_s`` and friends are measured.
* ``censored_memory``    -- the method's predicted memory (``memory_needed``) is above the
  memory cap, so it was not run (``wall_s`` None); or it ran and its RSS growth crossed the
  cap, so the worker was killed.
* ``censored_predicted`` -- the predictor (default: ``HeuristicPrior``) expects more than
  ``predicted_factor`` x the time cap, so it was not run (``wall_s`` None).
* ``censored_monotone``  -- the same monotone group (family+level) on the same backend already
  hit a cap at a smaller size; larger sizes are assumed to hit it too and are not run
  (``wall_s`` = time cap, an assumed lower bound).
* ``censored_time``      -- ran past the time cap and the worker was killed (``wall_s`` = cap,
  a lower bound; ``cap_s`` = cap).
* ``error``              -- the backend (or building the case) raised; ``error`` says why.

Pairs a backend cannot run at all (stabilizer on a non-Clifford circuit, too many qubits,
more memory than the machine has) are removed by placement's own ``DEFAULT_FILTERS`` and
record nothing, exactly as placement would never send them there.

Why a persistent worker process: a run that exceeds a cap must be killable (Aer's C++ does
not return to Python until it is done), so runs happen in a child process; spawning a fresh
Python per run costs ~1-2 s of imports, so one child serves all runs and is respawned only
after a kill. Transpiling happens inside ``Backend.run``, so it is under the caps too, and
so is building the case (MQT Bench's INDEP level transpiles while generating).

Other work under the same caps: ``Worker.call(("call", "module:function", args), timeout_s)``
runs any importable function in the worker and returns its (picklable) value; the placement
benchmark runs its emulated-QPU fidelity measurements and device transpiles that way.

Memory measurement: before each request the worker resets its kernel peak-RSS counter
(``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and reads ``VmHWM`` afterwards; the parent
also samples the worker's RSS with psutil every few ms (that sampling enforces the cap).
``peak_memory_bytes`` = max(exact VmHWM, sampled peak) - RSS before the request: the memory
the run *added* on top of the idle worker, which is what ``memory_needed`` (16·2ⁿ for a
statevector) predicts. Where clear_refs is unavailable only the sampled peak is used.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import zlib
from multiprocessing.connection import Connection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ray_qalloc.costmodel.history import RunHistory

log = logging.getLogger(__name__)

DEFAULT_BACKENDS: tuple[str, ...] = ("aer_statevector", "aer_mps", "aer_stabilizer", "aer_density_matrix")
OUTCOMES: tuple[str, ...] = ("completed", "censored_time", "censored_memory", "censored_predicted",
                             "censored_monotone", "error")
DEFAULT_PREDICTED_FACTOR = 10.0
DEFAULT_PREPARE_TIMEOUT_S = 120.0
DEFAULT_BATCH = 20
_WORKER_START_TIMEOUT_S = 180.0
_SAMPLE_S = 0.01            # RSS sampling period while a request runs (doubles up to _SAMPLE_MAX_S)
_SAMPLE_MAX_S = 0.05
# A fixed mmap threshold turns off glibc's dynamic one, so big buffers (state vectors) are
# mmapped and handed back to the OS when freed; otherwise a freed 16 MB statevector stays in
# the heap, the next run reuses it, and its RSS growth (peak_memory_bytes) reads too low.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}
_RLIMIT_MARGIN = 2 * 2**30  # address-space backstop above baseline + 2x cap (the sampler is the real cap)


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MQTSource:
    """An MQT Bench circuit, built lazily (in the capped worker: INDEP generation transpiles)."""

    family: str
    level: str
    size: int

    def build(self) -> Any:
        from mqt.bench import BenchmarkLevel, get_benchmark

        return get_benchmark(self.family, BenchmarkLevel[self.level.upper()], circuit_size=self.size)


@dataclass(frozen=True)
class RandomSource:
    """``qiskit.circuit.random.random_circuit`` with two-qubit operands at most, measured."""

    num_qubits: int
    depth: int
    seed: int

    def build(self) -> Any:
        from qiskit.circuit.random import random_circuit

        return random_circuit(self.num_qubits, self.depth, max_operands=2, measure=True, seed=self.seed)


@dataclass(frozen=True)
class BrickworkSource:
    """``layers`` of random single-qubit rotations, each followed by a brick of CX on
    neighbouring pairs (alternating offsets), measured.

    Why a synthetic family: its bond dimension is known (χ = 2^min(layers, n/2)), so a grid of
    widths and depths puts runs on both sides of the MPS / statevector crossover, which no
    MQT family does by itself. (Qiskit's ``random_circuit`` is kept out of training sweeps: it
    is one of the families the accuracy benchmark holds out.)
    """

    num_qubits: int
    layers: int
    seed: int

    def build(self) -> Any:
        import numpy as np
        from qiskit import QuantumCircuit

        n, rng = self.num_qubits, np.random.default_rng(self.seed)
        qc = QuantumCircuit(n, n)
        for layer in range(self.layers):
            for q in range(n):
                qc.ry(float(rng.uniform(0, np.pi)), q)
                qc.rz(float(rng.uniform(0, 2 * np.pi)), q)
            for q in range(layer % 2, n - 1, 2):
                qc.cx(q, q + 1)
        qc.measure(range(n), range(n))
        return qc


@dataclass(frozen=True)
class QuantumVolumeSource:
    """Qiskit's quantum volume expanded to ``u``/``cx`` (as ``benchmarks.traces`` builds it):
    volume-law entanglement, the case where MPS explodes and statevector is the answer."""

    num_qubits: int
    seed: int

    def build(self) -> Any:
        from qiskit import transpile
        from qiskit.circuit.library import quantum_volume

        qc = transpile(quantum_volume(self.num_qubits, seed=self.seed), basis_gates=["u", "cx"],
                       optimization_level=0)
        qc.measure_all()
        return qc


@dataclass(frozen=True)
class SweepCase:
    """One circuit of a sweep; it is run once on every backend that can run it.

    ``source`` is a QuantumCircuit, OpenQASM text, or an object with ``build()`` (built in the
    worker, under the caps). ``group`` names the monotone group: within it, runtime is assumed
    to grow with ``size``; None means no monotone assumption (unrelated file/trace circuits).
    """

    case_id: str
    family: str
    level: str
    size: int
    shots: int
    source: Any = field(compare=False, repr=False)
    group: str | None = None

    @property
    def monotone_group(self) -> str | None:
        return self.group


def mqt_cases(families: Sequence[str], sizes: Sequence[int], levels: Sequence[str] = ("alg",),
              shots: int = 1024) -> list[SweepCase]:
    """Every family x size x level of MQT Bench (circuits are built later, in the worker)."""
    return [SweepCase(f"mqt:{fam}:{lvl.lower()}:{n}", fam, lvl.lower(), int(n), shots,
                      MQTSource(fam, lvl.lower(), int(n)), group=f"mqt:{fam}:{lvl.lower()}")
            for fam in families for lvl in levels for n in sizes]


def random_cases(sizes: Sequence[int], depths: Sequence[int], seeds: Sequence[int],
                 shots: int = 1024) -> list[SweepCase]:
    """Qiskit random circuits; one monotone group per depth (seeds of one depth cost alike)."""
    return [SweepCase(f"random:{n}:d{d}:s{s}", "random", "random", int(n), shots,
                      RandomSource(int(n), int(d), int(s)), group=f"random:d{d}")
            for d in depths for s in seeds for n in sizes]


def brickwork_cases(sizes: Sequence[int], layers: Sequence[int], seed: int = 1,
                    shots: int = 1024) -> list[SweepCase]:
    """Brickwork circuits; one monotone group per layer count."""
    return [SweepCase(f"brick:{n}:l{d}:s{seed}", "brickwork", "synthetic", int(n), shots,
                      BrickworkSource(int(n), int(d), int(seed)), group=f"brick:l{d}")
            for d in layers for n in sizes]


def quantum_volume_cases(sizes: Sequence[int], seed: int = 3, shots: int = 1024) -> list[SweepCase]:
    return [SweepCase(f"qv:{n}:s{seed}", "quantumvolume", "synthetic", int(n), shots,
                      QuantumVolumeSource(int(n), int(seed)), group="qv")
            for n in sizes]


def source_of_case_id(case_id: str) -> Any:
    """The buildable source behind a sweep case id, or None (file, trace and live rows).

    Why: a history row keeps the features computed when it was measured; when the feature
    schema changes, sweep rows can be featurised again from their case (see
    ``costmodel.model.refeaturize``) instead of being measured again.
    """
    parts = case_id.split(":")
    try:
        if parts[0] == "mqt" and len(parts) == 4:
            return MQTSource(parts[1], parts[2], int(parts[3]))
        if parts[0] == "random" and len(parts) == 4:
            return RandomSource(int(parts[1]), int(parts[2][1:]), int(parts[3][1:]))
        if parts[0] == "brick" and len(parts) == 4:
            return BrickworkSource(int(parts[1]), int(parts[2][1:]), int(parts[3][1:]))
        if parts[0] == "qv" and len(parts) == 3:
            return QuantumVolumeSource(int(parts[1]), int(parts[2][1:]))
    except ValueError:
        return None
    return None


def cases_from_path(path: Path | str, shots: int = 1024) -> list[SweepCase]:
    """Cases from a directory (or single file) of ``.qasm`` files, or a JSONL trace.

    A trace has one job per line: ``{"id", "arrival_s", "qasm", "shots", ...}``; its case ids
    are ``trace:<id>``, a file's ``file:<name>``. Sizes come from a bounded intake parse.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".qasm", ".qasm2", ".qasm3"))
        return [_file_case(p, shots) for p in files]
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        return list(_trace_cases(path, shots))
    return [_file_case(path, shots)]


def _file_case(p: Path, shots: int) -> SweepCase:
    text = p.read_text(encoding="utf-8")
    return SweepCase(f"file:{p.name}", "file", "qasm", _qasm_width(text), shots, text)


def _trace_cases(path: Path, shots: int) -> Iterator[SweepCase]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            text = rec["qasm"]
            job_id = rec.get("id", lineno)
            yield SweepCase(f"trace:{job_id}", str(rec.get("family", "trace")), "qasm",
                            _qasm_width(text), int(rec.get("shots", shots)), text)


def _qasm_width(text: str) -> int:
    """Qubits of a QASM program via intake's bounded parser; 0 when it does not parse
    (the case is still recorded, as an error, when the worker prepares it)."""
    from ray_qalloc.circuits import parse_circuit
    from ray_qalloc.config import Limits

    try:
        return parse_circuit(text, Limits()).circuit.num_qubits
    except Exception:  # noqa: BLE001 - intake errors become an 'error' row later
        return 0


# Default sweep: chosen to cover the widths and depths where the Aer methods cross over, in
# about 15-30 minutes on 2 shared cores (time cap 10 s, short runs repeated, minimum kept).
# Why these families and sizes:
# * statevector time grows x4-5 per 2 qubits past ~20 and density matrix x16, so sizes step by
#   4 up to 24 (statevector 24 ~ 1-4 s here); density matrix stops at its memory cap (~13).
# * MPS follows the entanglement a circuit reaches: product-state-like (qft on |0>, dj, bv),
#   bond dimension 2 (ghz, wstate), growing with depth (brickwork layers 2-16, the controlled
#   crossover grid), volume law (quantum volume, qaoa, randomcircuit, vqe) -- both sides of the
#   statevector line at every width.
# * multi-controlled and composite gates (grover, adders, qpe*, ae) that Aer runs natively on a
#   statevector but transpiles into long CX chains for MPS.
# * qft, qpeexact, wstate and Qiskit's random circuits are in the sweep for the shipped model;
#   the accuracy benchmark holds them out of training (``--holdout``) to score unseen families.
# Families whose transpile blows up (grover, qwalk: NOTES saw grover 20+ use all 24 GiB) stay small.
DEFAULT_FAMILY_SIZES: dict[str, tuple[int, ...]] = {
    "ghz": (8, 16, 20, 24),
    "graphstate": (8, 16, 20, 24),
    "dj": (8, 16, 20, 24),
    "bv": (8, 16, 20, 24),
    "qftentangled": (8, 12, 16, 20, 24),
    "qaoa": (8, 12, 16, 20),
    "ae": (8, 12, 16, 20),
    "vqe_real_amp": (8, 12, 16, 20),
    "vqe_su2": (8, 12, 16),
    "randomcircuit": (8, 12, 16),
    "qnn": (8, 12, 16),
    "grover": (4, 6, 8),
    "qpeinexact": (8, 12, 16, 20),
    "cdkm_ripple_carry_adder": (8, 12, 16, 20),
    "draper_qft_adder": (8, 12, 16, 20),
    "qft": (8, 12, 16, 20, 24),
    "wstate": (8, 12, 16, 20, 24),
    "qpeexact": (8, 12, 16, 20),
}
DEFAULT_LEVELS: tuple[str, ...] = ("alg",)
DEFAULT_RANDOM = {"sizes": (8, 12, 16, 20), "depths": (10, 30), "seeds": (1,)}
DEFAULT_BRICKWORK = {"sizes": (10, 14, 18, 22), "layers": (2, 4, 8, 16)}
DEFAULT_QV = (8, 12, 16, 18)
DEFAULT_TIME_CAP_S = 10.0

# quick=True: tiny, every Aer method completes in well under a second per run.
QUICK_FAMILY_SIZES: dict[str, tuple[int, ...]] = {"ghz": (3, 6), "graphstate": (4,), "qft": (4, 6), "qaoa": (4,),
                                                   "wstate": (4,), "dj": (4,)}
QUICK_RANDOM = {"sizes": (4, 6), "depths": (6,), "seeds": (1,)}


def default_sweep(quick: bool = False) -> list[SweepCase]:
    """The sweep ``qalloc measure`` runs by default (see DEFAULT_FAMILY_SIZES for why).

    Full: 18 MQT families, 8 random, 16 brickwork and 4 quantum-volume cases = 95 cases; with
    the four Aer methods ~300 (case, method) pairs pass the filters. ``quick``: 8 MQT + 2 random
    cases at 3-6 qubits (ALG only), for tests and CI (~2-5 s on 2 cores, most of it the
    worker's imports).
    """
    if quick:
        cases: list[SweepCase] = []
        for fam, sizes in QUICK_FAMILY_SIZES.items():
            cases += mqt_cases([fam], sizes, ("alg",))
        return cases + random_cases(QUICK_RANDOM["sizes"], QUICK_RANDOM["depths"], QUICK_RANDOM["seeds"])
    cases = []
    for fam, sizes in DEFAULT_FAMILY_SIZES.items():
        cases += mqt_cases([fam], sizes, DEFAULT_LEVELS)
    cases += random_cases(DEFAULT_RANDOM["sizes"], DEFAULT_RANDOM["depths"], DEFAULT_RANDOM["seeds"])
    cases += brickwork_cases(DEFAULT_BRICKWORK["sizes"], DEFAULT_BRICKWORK["layers"])
    cases += quantum_volume_cases(DEFAULT_QV)
    return cases


# ---------------------------------------------------------------------------------------------
# Worker process
# ---------------------------------------------------------------------------------------------

def _read_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's VmHWM so that it measures the next request only."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc only; a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _set_address_limit(memory_cap_bytes: int) -> None:
    """Backstop for a single giant allocation the RSS sampler could miss between samples."""
    try:
        import resource

        vms = _read_status_kb("VmSize") or 0
        limit = vms + 2 * memory_cap_bytes + _RLIMIT_MARGIN
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass


def _worker_entry() -> None:
    """``python -c`` entry of the worker: argv = socket fd, threads, memory cap."""
    fd, threads, cap = (int(a) for a in sys.argv[1:4])
    _worker_main(Connection(fd), threads, cap)


def _worker_main(conn: Any, threads: int, memory_cap_bytes: int) -> None:
    """Serve ``prepare`` and ``run`` requests until told to stop (runs in the child)."""
    import logging as _logging
    import signal
    import warnings

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it flushes, then kills us)
    _logging.disable(_logging.WARNING)
    warnings.simplefilter("ignore")
    # Imports paid once, before "ready", so no run's timing includes them.
    import qiskit_aer  # noqa: F401

    from ray_qalloc import circuits  # noqa: F401
    from ray_qalloc.backends import registry  # noqa: F401
    from ray_qalloc.jobs import prepare_job  # noqa: F401

    _set_address_limit(memory_cap_bytes)
    # Build and warm the Aer backends before "ready": their first-use costs (simulator, pass
    # manager, first run; ~1 s together) must not count against any run's time cap.
    backends: dict[str, Any] = {}
    for name in registry.AER_POOL:
        backends[name] = registry.make_backend(name, threads=threads)
        backends[name].warm_up()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            req = conn.recv()
        except EOFError:
            return
        if req[0] == "stop":
            return
        exact = _reset_peak()
        reply = _handle(req, backends, threads)
        del req  # the request's circuit and payload are freed before trimming
        peak = _read_status_kb("VmHWM") if exact else None
        _trim_heap()  # so that the parent's baseline for the next request is the idle worker
        conn.send(reply + (peak,))


def _handle(req: tuple, backends: dict[str, Any], threads: int) -> tuple[str, Any]:
    """One request in the worker: ("ok", value), ("memory", text) or ("error", text)."""
    from ray_qalloc.backends.registry import make_backend
    from ray_qalloc.config import Limits
    from ray_qalloc.jobs import make_spec, prepare_job

    try:
        if req[0] == "call":
            # ("call", "module:function", args): any importable function under the same caps
            # (benchmarks use it for emulated-QPU fidelity runs and device transpiles)
            import importlib

            _, target, args = req
            module, _, func = str(target).partition(":")
            return "ok", getattr(importlib.import_module(module), func)(*args)
        if req[0] == "prepare":
            _, source, shots = req
            circuit = source.build() if hasattr(source, "build") else source
            return "ok", prepare_job(make_spec(circuit=circuit, shots=shots), Limits())
        _, name, payload, shots, seed = req
        backend = backends.get(name)
        if backend is None:
            backend = backends[name] = make_backend(name, threads=threads)
            warm = getattr(backend, "warm_up", None)
            if warm is not None:  # first-use costs (simulator, pass manager) are not the circuit's
                warm()
        return "ok", _run_payload(backend, payload, shots, seed)
    except MemoryError as exc:
        return "memory", f"MemoryError: {exc}"
    except Exception as exc:  # noqa: BLE001 - every failure becomes an 'error' row
        return "error", f"{type(exc).__name__}: {exc}"[:2000]


def _run_payload(backend: Any, payload: bytes, shots: int, seed: int) -> dict[str, Any]:
    """Decode the job as a live backend actor does, run it, and keep only what is recorded."""
    from ray_qalloc.circuits import decode_payload

    circuit = decode_payload(payload)
    cpu0 = time.process_time()
    res = backend.run(circuit, shots, seed=seed)
    cpu_s = time.process_time() - cpu0   # every thread of this process, Aer's included
    return {"wall_s": res.wall_s, "cpu_s": cpu_s, "transpile_s": res.transpile_s, "execute_s": res.execute_s,
            "qpu_s": res.qpu_s, "method": res.method,
            "noise_model": (res.metadata or {}).get("noise_model")}


@dataclass
class CallResult:
    """How one request to the worker ended."""

    status: str                 # "ok" | "error" | "timeout" | "memory" | "died"
    value: Any = None
    elapsed_s: float = 0.0
    peak_memory_bytes: float | None = None
    cpu_s: float | None = None  # CPU seconds the worker spent on the request (sampled when killed)


class Worker:
    """One persistent child process that runs requests under a time and an RSS cap.

    Why a class with explicit kill/respawn: after a cap is hit the child is SIGKILLed (Aer
    cannot be interrupted), and the next request transparently starts a fresh one.
    """

    def __init__(self, *, threads: int = 1, memory_cap_bytes: int = 4 * 2**30) -> None:
        self.threads = threads
        self.memory_cap_bytes = int(memory_cap_bytes)
        self._proc: subprocess.Popen | None = None
        self._conn: Any = None
        self._ps: Any = None
        self.spawns = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> None:
        """Start the child if none is alive: a fresh interpreter talking over a socketpair.

        Why not multiprocessing's spawn: it re-imports the parent's ``__main__``, which breaks
        (or re-runs) any script calling ``measure`` without a ``__main__`` guard.
        """
        import psutil

        if self.pid is not None:
            return
        ours, theirs = socket.socketpair()
        code = "from ray_qalloc.costmodel.measure import _worker_entry; _worker_entry()"
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(theirs.fileno()), str(self.threads), str(self.memory_cap_bytes)],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            env={**os.environ, **_MALLOC_ENV})
        theirs.close()
        conn = Connection(ours.detach())
        try:
            if not conn.poll(_WORKER_START_TIMEOUT_S):
                raise EOFError
            conn.recv()
        except (EOFError, OSError):
            proc.kill()
            proc.wait()
            conn.close()
            raise RuntimeError(f"the measurement worker did not start (exit code {proc.returncode})") from None
        self._proc, self._conn, self._ps = proc, conn, psutil.Process(proc.pid)
        self.spawns += 1
        log.debug("measurement worker %s started", proc.pid)

    def kill(self) -> None:
        """SIGKILL the child (the only way to stop a native simulation) and reap it."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._conn.close()
        self._proc = self._conn = self._ps = None

    def close(self) -> None:
        if self.pid is not None:
            try:
                self._conn.send(("stop",))
                self._proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def call(self, request: tuple, timeout_s: float) -> CallResult:
        """Send one request; wait at most ``timeout_s`` and kill the child on a cap breach."""
        self.start()
        baseline = self._rss()
        cpu0 = self._cpu()
        peak_sampled = baseline
        t0 = time.perf_counter()
        self._conn.send(request)
        period = _SAMPLE_S
        while True:
            elapsed = time.perf_counter() - t0
            remaining = timeout_s - elapsed
            if remaining <= 0:
                cpu = self._cpu()
                self.kill()
                used = None if cpu is None or cpu0 is None else cpu - cpu0
                return CallResult("timeout", None, elapsed, max(peak_sampled - baseline, 0), used)
            try:
                ready = self._conn.poll(min(period, remaining))
            except (EOFError, OSError):
                ready = True
            if ready:
                return self._reply(t0, baseline, peak_sampled)
            rss = self._rss()
            peak_sampled = max(peak_sampled, rss)
            if rss - baseline > self.memory_cap_bytes:
                self.kill()
                return CallResult("memory", f"RSS grew by {rss - baseline} bytes, above the memory cap "
                                            f"{self.memory_cap_bytes}", time.perf_counter() - t0,
                                  float(rss - baseline))
            period = min(period * 2, _SAMPLE_MAX_S)

    def _reply(self, t0: float, baseline: int, peak_sampled: int) -> CallResult:
        try:
            status, value, hwm = self._conn.recv()
        except (EOFError, OSError):
            code = self._proc.poll() if self._proc is not None else None
            self.kill()
            return CallResult("died", f"worker died (exit code {code})", time.perf_counter() - t0,
                              float(max(peak_sampled - baseline, 0)))
        elapsed = time.perf_counter() - t0
        peak = max(peak_sampled, hwm or 0) - baseline
        return CallResult(status, value, elapsed, float(max(peak, 0)))

    def _cpu(self) -> float | None:
        """CPU seconds the worker has used so far (user + system, all its threads)."""
        try:
            t = self._ps.cpu_times()
            return float(t.user + t.system)
        except Exception:  # noqa: BLE001 - the child just died
            return None

    def _rss(self) -> int:
        try:
            return int(self._ps.memory_info().rss)
        except Exception:  # noqa: BLE001 - the child just died; the reply path reports it
            return 0


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------

@dataclass
class MeasureReport:
    """What one ``measure`` call did; ``rows`` are the records it appended."""

    attempted: int = 0          # pairs run in the worker (completed, timed out, killed, errored)
    completed: int = 0
    censored: int = 0           # every censored_* outcome, run or not
    skipped_existing: int = 0   # pairs already in the history (resume)
    errors: int = 0
    wall_s: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)
    filtered: int = 0           # pairs no filter lets through (recorded nowhere)
    by_outcome: dict[str, int] = field(default_factory=dict)


class _Ids:
    """Unique int64 attempt ids: time_ns, strictly increasing within the process."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        self._last = max(self._last + 1, time.time_ns())
        return self._last


def _feature_schema() -> int:
    from ray_qalloc.circuits import FEATURE_SCHEMA_VERSION

    return FEATURE_SCHEMA_VERSION


def case_seed(case_id: str) -> int:
    """Stable simulator seed per case, so a rerun samples the same counts."""
    return zlib.crc32(case_id.encode("utf-8")) & 0x7FFFFFFF


def _existing_pairs(table: Any) -> set[tuple[str, str]]:
    if table.num_rows == 0 or "case_id" not in table.column_names:
        return set()
    cases = table.column("case_id").to_pylist()
    backs = table.column("backend").to_pylist()
    return {(c, b) for c, b in zip(cases, backs) if c is not None}


# Outcomes that mean "this size already hit a cap" (memory censored by formula included: the
# formula grows with size too, so nothing is lost by carrying it over).
_CAP_HITS = frozenset({"censored_time", "censored_memory", "censored_monotone"})


def _monotone_from_history(table: Any, cases: Sequence[SweepCase]) -> dict[tuple[str, str], int]:
    """Smallest size per (group, backend) that hit a cap in earlier (resumed) sweeps.

    Groups of rows whose case is not in this sweep are recovered from the case id
    (``mqt:<family>:<level>:<n>``, ``random:<n>:d<depth>:s<seed>``).
    """
    if table.num_rows == 0 or "case_id" not in table.column_names:
        return {}
    by_id = {c.case_id: (c.group, c.size) for c in cases if c.group}
    out: dict[tuple[str, str], int] = {}
    for cid, backend, outcome in zip(table.column("case_id").to_pylist(), table.column("backend").to_pylist(),
                                     table.column("outcome").to_pylist()):
        if cid is None or outcome not in _CAP_HITS:
            continue
        group, size = by_id.get(cid) or _group_of_id(cid)
        if group is not None:
            key = (group, backend)
            out[key] = min(out.get(key, size), size)
    return out


def _group_of_id(case_id: str) -> tuple[str | None, int]:
    """Inverse of the ids ``mqt_cases`` and ``random_cases`` build; (None, 0) otherwise."""
    parts = case_id.split(":")
    try:
        if parts[0] == "mqt" and len(parts) == 4:
            return ":".join(parts[:3]), int(parts[3])
        if parts[0] == "random" and len(parts) == 4:
            return f"random:{parts[2]}", int(parts[1])
        if parts[0] == "brick" and len(parts) == 4:
            return f"brick:{parts[2]}", int(parts[1])
        if parts[0] == "qv" and len(parts) == 3:
            return "qv", int(parts[1])
    except ValueError:
        pass
    return None, 0


def _backend_views(names: Sequence[str], threads: int) -> dict[str, Any]:
    """Specs (and QPU calibration summaries) built in this process: cheap, nothing is run."""
    from ray_qalloc.backends.registry import make_backend
    from ray_qalloc.placement.model import BackendView

    views = {}
    for name in names:
        b = make_backend(name, threads=threads)
        spec = b.spec()
        cal = b.calibration() if spec.kind == "qpu" else None
        views[name] = BackendView(spec=spec, calibration=cal.summary() if cal is not None else None)
    return views


def _job_view(case: SweepCase, job: Any) -> Any:
    from ray_qalloc.placement.model import JobView

    return JobView(case.case_id, job.num_qubits, job.ops, job.features, job.shots)


def _blocked(job_view: Any, view: Any) -> str | None:
    """Reason the pair cannot run at all (placement's filters), or None."""
    from ray_qalloc.placement.filters import DEFAULT_FILTERS

    for flt in DEFAULT_FILTERS:
        status = flt.check(job_view, view)
        if not status.ok:
            return f"{status.plugin}: {'; '.join(status.reasons)}"
    return None


class _Recorder:
    """Builds records and appends them to the history in batches (and on the way out)."""

    def __init__(self, history: RunHistory, source: str, batch: int, report: MeasureReport,
                 time_cap_s: float) -> None:
        self.history, self.source, self.batch, self.report = history, source, batch, report
        self.time_cap_s = time_cap_s
        self.pending: list[dict[str, Any]] = []
        self.ids = _Ids()

    def add(self, case: SweepCase, backend: str, outcome: str, *, job: Any = None,
            started_at: float | None = None, finished_at: float | None = None, **values: Any) -> dict[str, Any]:
        now = time.time()
        rec: dict[str, Any] = {
            "attempt_id": self.ids.next(), "job_id": case.case_id, "n": 1, "backend": backend,
            "outcome": outcome, "censored": outcome.startswith("censored"),
            "started_at": started_at if started_at is not None else now,
            "finished_at": finished_at if finished_at is not None else now,
            "shots": case.shots, "num_qubits": job.num_qubits if job is not None else (case.size or None),
            "features": dict(job.features) if job is not None else {},
            "case_id": case.case_id, "family": case.family, "level": case.level,
            "cap_s": self.time_cap_s, "intent": "auto", "load_avg": load_average(),
            "feature_schema_version": _feature_schema() if job is not None else None,
        }
        rec.update(values)
        self.pending.append(rec)
        r = self.report
        r.rows.append(rec)
        r.by_outcome[outcome] = r.by_outcome.get(outcome, 0) + 1
        r.completed += outcome == "completed"
        r.censored += rec["censored"]
        r.errors += outcome == "error"
        if len(self.pending) >= self.batch:
            self.flush()
        return rec

    def flush(self) -> None:
        if self.pending:
            self.history.append(self.pending, source=self.source)
            self.pending = []


@dataclass
class _Caps:
    time_cap_s: float
    memory_cap_bytes: int
    predicted_factor: float | None
    prepare_timeout_s: float
    repeats: int = 1
    repeat_below_s: float = 0.0


DEFAULT_REPEATS = 3
DEFAULT_REPEAT_BELOW_S = 1.0


def load_average() -> float | None:
    """The 1-minute load average, recorded with every run: on a shared machine a run measured
    under load reads slow, and the row should say so."""
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


def measure(cases: Sequence[SweepCase], backends: Sequence[str], history: RunHistory, *,
            time_cap_s: float = 20.0, memory_cap_bytes: int = 4 * 2**30, resume: bool = True,
            progress: bool = True, predictor: Any = None, source: str = "sweep",
            predicted_factor: float | None = DEFAULT_PREDICTED_FACTOR, threads: int = 1,
            prepare_timeout_s: float = DEFAULT_PREPARE_TIMEOUT_S, batch: int = DEFAULT_BATCH,
            worker: Worker | None = None, repeats: int = DEFAULT_REPEATS,
            repeat_below_s: float = DEFAULT_REPEAT_BELOW_S) -> MeasureReport:
    """Run every (case, backend) pair once under the caps and append one row per pair.

    Cases run smallest first, so that monotone censoring can skip larger sizes of a group
    that already hit a cap. Records are appended every ``batch`` rows and on the way out
    (also on Ctrl-C), so an interrupted sweep resumes where it stopped (``resume=True``).
    ``predicted_factor=None`` turns off censoring by prediction (the heuristic prior's MPS
    formula overestimates low-entanglement circuits such as QFT by orders of magnitude, so
    a sweep meant to correct the prior may want to run those anyway; the time cap still
    bounds them). ``threads`` is the simulator threads per run (live default: 1). Pass
    ``worker`` to reuse one worker process across calls (tests, benchmarks); it keeps the
    ``threads`` it was built with.

    Noise: a run that completed in under ``repeat_below_s`` is run again, up to ``repeats``
    times in all, and the fastest is kept (``repeats`` column): on a shared machine other work
    only ever adds time, so the minimum is the best estimate of the run's own cost. Long runs
    are not repeated (their cost is not small). Every row records the 1-minute load average
    when it ran (``load_avg``) and the CPU seconds the run itself used (``cpu_s``, least of the
    repeats: all threads of the worker, Aer's included): on a loaded machine wall time measures
    the load as much as the run (docs/notes.md), CPU time far less.
    """
    from ray_qalloc.costmodel.prior import HeuristicPrior

    t_start = time.perf_counter()
    predictor = predictor or HeuristicPrior()
    caps = _Caps(float(time_cap_s), int(memory_cap_bytes),
                 None if predicted_factor is None else float(predicted_factor), float(prepare_timeout_s),
                 max(int(repeats), 1), float(repeat_below_s))
    report = MeasureReport()
    past = history.read() if resume else None
    done = _existing_pairs(past) if past is not None else set()
    monotone = _monotone_from_history(past, cases) if past is not None else {}
    views = _backend_views(backends, threads)
    ordered = sorted(cases, key=lambda c: c.size)
    rec = _Recorder(history, source, batch, report, caps.time_cap_s)
    own_worker = worker is None
    worker = worker or Worker(threads=threads, memory_cap_bytes=caps.memory_cap_bytes)
    worker.memory_cap_bytes = caps.memory_cap_bytes  # a shared worker enforces this call's cap
    bar = _Progress(progress, len(ordered) * len(backends))
    try:
        with bar:
            for case in ordered:
                todo = [b for b in backends if (case.case_id, b) not in done]
                report.skipped_existing += len(backends) - len(todo)
                bar.advance(len(backends) - len(todo))
                if todo:
                    _measure_case(case, todo, views, worker, predictor, caps, monotone, rec, bar)
    finally:
        rec.flush()
        if own_worker:
            worker.close()
        report.wall_s = time.perf_counter() - t_start
    return report


def _measure_case(case: SweepCase, backends: Sequence[str], views: Mapping[str, Any], worker: Worker,
                  predictor: Any, caps: _Caps, monotone: dict[tuple[str, str], int], rec: _Recorder,
                  bar: "_Progress") -> None:
    """Prepare the case once (in the worker), then settle each backend in turn."""
    bar.describe(f"{case.case_id} (prepare)")
    t_wall = time.time()
    res = worker.call(("prepare", case.source, case.shots), caps.prepare_timeout_s)
    if res.status != "ok":
        outcome = {"timeout": "censored_time", "memory": "censored_memory"}.get(res.status, "error")
        why = res.value or f"preparing the case hit its {res.status} cap"
        for b in backends:
            rec.add(case, b, outcome, started_at=t_wall, finished_at=time.time(),
                    error=f"prepare: {why}", method=views[b].spec.method)
            rec.report.attempted += 1
        bar.advance(len(backends))
        return
    job = res.value
    jv = _job_view(case, job)
    for b in backends:
        bar.describe(f"{case.case_id} on {b}")
        _measure_pair(case, job, jv, views[b], worker, predictor, caps, monotone, rec)
        bar.advance(1)


def _measure_pair(case: SweepCase, job: Any, jv: Any, view: Any, worker: Worker, predictor: Any,
                  caps: _Caps, monotone: dict[tuple[str, str], int], rec: _Recorder) -> None:
    """One (case, backend): filter, censor without running, or run under the caps."""
    from ray_qalloc.placement.filters import memory_needed

    name, spec = view.name, view.spec
    reason = _blocked(jv, view)
    if reason is not None:
        rec.report.filtered += 1
        log.debug("%s on %s filtered: %s", case.case_id, name, reason)
        return
    predicted = float(predictor.predict(jv, [view])[0].runtime_s)
    common = {"job": job, "predicted_s": predicted, "method": spec.method}
    need = memory_needed(spec.method, job.num_qubits) if spec.kind == "simulator" else 0.0
    if need > caps.memory_cap_bytes:
        rec.add(case, name, "censored_memory", error=f"predicted memory {need:.3g} B > cap "
                f"{caps.memory_cap_bytes} B; not run", **common)
        return
    key = (case.group, name) if case.group else None
    if key is not None and key in monotone and case.size > monotone[key]:
        rec.add(case, name, "censored_monotone", wall_s=caps.time_cap_s,
                error=f"{case.group} on {name} hit a cap at size {monotone[key]}; not run", **common)
        return
    if caps.predicted_factor is not None and predicted > caps.predicted_factor * caps.time_cap_s:
        rec.add(case, name, "censored_predicted", error=f"predicted {predicted:.3g} s > "
                f"{caps.predicted_factor:g} x cap {caps.time_cap_s:g} s; not run", **common)
        return
    _run_pair(case, job, name, worker, caps, monotone, key, rec, common)


def _run_pair(case: SweepCase, job: Any, name: str, worker: Worker, caps: _Caps,
              monotone: dict[tuple[str, str], int], key: tuple[str, str] | None, rec: _Recorder,
              common: dict[str, Any]) -> None:
    started = time.time()
    res = worker.call(("run", name, job.payload, case.shots, case_seed(case.case_id)), caps.time_cap_s)
    finished = time.time()
    rec.report.attempted += 1
    peak = res.peak_memory_bytes
    when = {"started_at": started, "finished_at": finished, "peak_memory_bytes": peak}
    if res.status == "ok":
        v, runs = res.value, 1
        cpu = v.get("cpu_s")
        while runs < caps.repeats and v["wall_s"] < caps.repeat_below_s:
            again = worker.call(("run", name, job.payload, case.shots, case_seed(case.case_id)), caps.time_cap_s)
            if again.status != "ok":
                break
            runs += 1
            if again.value.get("cpu_s") is not None:
                cpu = again.value["cpu_s"] if cpu is None else min(cpu, again.value["cpu_s"])
            if again.value["wall_s"] < v["wall_s"]:
                v = again.value
        common = {**common, "method": v.get("method") or common["method"]}
        rec.add(case, name, "completed", wall_s=v["wall_s"], transpile_s=v["transpile_s"],
                execute_s=v["execute_s"], qpu_s=v["qpu_s"], repeats=runs, cpu_s=cpu, **when, **common)
        return
    if res.status in ("timeout", "memory") and key is not None:
        monotone[key] = min(monotone.get(key, case.size), case.size)
    if res.status == "timeout":
        # cpu_s: what the run had used when killed, a lower bound on its CPU time
        rec.add(case, name, "censored_time", wall_s=caps.time_cap_s, cpu_s=res.cpu_s,
                error=f"killed at the time cap {caps.time_cap_s:g} s", **when, **common)
    elif res.status == "memory" or (res.status == "error" and _looks_like_memory(res.value)):
        rec.add(case, name, "censored_memory", error=str(res.value), **when, **common)
    else:
        rec.add(case, name, "error", error=str(res.value), **when, **common)


def _looks_like_memory(text: Any) -> bool:
    t = str(text).lower()
    return "memory" in t and ("insufficient" in t or "not enough" in t or "bad_alloc" in t or "memoryerror" in t)


class _Progress:
    """A rich progress bar, or nothing (``progress=False``)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self._bar: Any = None
        self._task: Any = None
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn)

            self._bar = Progress(TextColumn("[bold]measure[/] {task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn())
            self._task = self._bar.add_task("", total=total)

    def __enter__(self) -> "_Progress":
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self, n: int) -> None:
        if self._bar is not None and n:
            self._bar.advance(self._task, n)

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text)


__all__ = ["SweepCase", "MQTSource", "RandomSource", "MeasureReport", "Worker", "CallResult",
           "BrickworkSource", "QuantumVolumeSource", "brickwork_cases", "quantum_volume_cases",
           "source_of_case_id", "load_average",
           "mqt_cases", "random_cases", "cases_from_path", "default_sweep", "measure", "case_seed",
           "DEFAULT_BACKENDS", "DEFAULT_FAMILY_SIZES", "OUTCOMES"]


# ---------------------------------------------------------------------------------------------
# Featurising stored rows again
# ---------------------------------------------------------------------------------------------

def refeaturize(src: Path | str, dst: Path | str, *, progress: bool = False) -> dict[str, int]:
    """Copy the history at ``src`` to ``dst`` with every sweep row's circuit features computed
    again by this code, from the case its ``case_id`` names (``source_of_case_id``).

    Why: features are stored with each row when it is measured; a new feature schema would
    otherwise throw the measurements away. Rows whose circuit cannot be rebuilt (live jobs,
    files, traces) are copied unchanged: training leaves them out while their schema is old
    (``costmodel.model.current_feature_rows``). Returns counts of rows rebuilt and kept as they were.
    """
    from ray_qalloc.circuits import FEATURE_SCHEMA_VERSION
    from ray_qalloc.config import Limits
    from ray_qalloc.jobs import make_spec, prepare_job

    table = RunHistory(src).read()
    rows = table.to_pylist()
    cache: dict[tuple[str, int], dict[str, float] | None] = {}
    out: dict[str, list[dict[str, Any]]] = {}
    counts = {"rebuilt": 0, "unchanged": 0}
    for row in rows:
        cid, shots = row.get("case_id"), int(row.get("shots") or 1024)
        source = source_of_case_id(cid) if cid else None
        feats: dict[str, float] | None = None
        if source is not None:
            key = (cid, shots)
            if key not in cache:
                try:
                    job = prepare_job(make_spec(circuit=source.build(), shots=shots), Limits())
                    cache[key] = dict(job.features)
                except Exception as exc:  # noqa: BLE001 - the row keeps its old features
                    log.warning("refeaturize: %s could not be rebuilt (%s)", cid, exc)
                    cache[key] = None
                if progress:
                    print(f"refeaturize: {len(cache)} cases", end="\r", flush=True)
            feats = cache[key]
        rec = {k: v for k, v in row.items() if not k.startswith("f_")}
        rec["features"] = feats if feats is not None else json.loads(row.get("features_json") or "{}")
        if feats is not None:
            rec["feature_schema_version"] = FEATURE_SCHEMA_VERSION
            counts["rebuilt"] += 1
        else:
            counts["unchanged"] += 1
        out.setdefault(str(row.get("source") or "sweep"), []).append(rec)
    hist = RunHistory(dst)
    for source_name, recs in out.items():
        hist.append(recs, source=source_name)
    return counts


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m ray_qalloc.costmodel.measure sweep HISTORY`` (the default sweep, as the shipped
    model was trained on it) or ``... refeaturize SRC DST``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m ray_qalloc.costmodel.measure")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sw = sub.add_parser("sweep", help="measure the default sweep into a run history (resumable)")
    sw.add_argument("history")
    sw.add_argument("--time-cap", type=float, default=DEFAULT_TIME_CAP_S)
    sw.add_argument("--quick", action="store_true")
    ref = sub.add_parser("refeaturize", help="copy a run history with sweep rows' features computed again")
    ref.add_argument("src")
    ref.add_argument("dst")
    args = ap.parse_args(argv)
    if args.cmd == "sweep":
        # predicted_factor=None: every pair is tried (the time cap bounds it), since the prior's
        # own estimates are what the sweep corrects
        report = measure(default_sweep(quick=args.quick), DEFAULT_BACKENDS, RunHistory(args.history),
                         time_cap_s=args.time_cap, predicted_factor=None)
        print(json.dumps({"attempted": report.attempted, "completed": report.completed, "censored": report.censored,
                          "errors": report.errors, "wall_s": round(report.wall_s, 1), "by_outcome": report.by_outcome}))
        return 0
    print(json.dumps(refeaturize(args.src, args.dst, progress=True)))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
