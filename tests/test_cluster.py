"""cluster.yaml against the installed Ray's cluster-config schema, and autoscaling on Ray's
fake multinode provider: a request for a resource the cluster lacks launches the node type
that offers it, and clearing the request gives the idle node back.

Why a subprocess for the autoscaling test: it needs its own Ray head (with an autoscaler),
while the session's ``qa`` fixture may hold a local Ray in this process. The child starts
the head with ``ray start --head --block`` on free ports and its own temp dir, and stops
exactly the processes it started (never ``ray stop``, which would end every Ray on the
machine, other test sessions' included). ``ray.cluster_utils.AutoscalingCluster`` does the
same set-up but calls ``ray stop --force`` and reads an example config the Ray wheel does not
ship, so the child writes the equivalent config itself (the provider block is that example's).

Run by hand: ``python tests/test_cluster.py`` prints the timeline of one autoscaling run.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
GPU_BACKEND = "aer_statevector_gpu"
HEAD_BACKEND = "aer_stabilizer"       # declared by the fake cluster's head
ELASTIC_BACKEND = "aer_statevector"   # offered only by the cpu_worker type (scaled to zero)


def _config() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _cpu_pool_resources() -> dict[str, int]:
    from ray_qalloc.backends.registry import DEFAULT_POOL, make_backend

    return {make_backend(n).spec().resource_name: make_backend(n).spec().slots for n in DEFAULT_POOL}


# ---- the config ---------------------------------------------------------------------------------
def test_cluster_yaml_matches_rays_schema():
    """The raw file and the file as `ray up` prepares it (provider defaults filled in) both pass
    the schema shipped in the installed Ray, plus Ray's own cross-field checks."""
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _config()
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)            # no unknown keys, right types, before defaults
    prepared = prepare_config(raw)
    validate_config(prepared)                   # schema again, min/max workers, head type
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head"
    assert set(types) == {"head", "cpu_worker", "gpu_worker"}
    assert types["head"]["max_workers"] == 0


def test_node_types_declare_the_backends_they_host():
    types = _config()["available_node_types"]
    assert types["cpu_worker"]["resources"] == _cpu_pool_resources()
    from ray_qalloc.backends.registry import make_backend

    gpu = make_backend(GPU_BACKEND).spec()
    assert types["gpu_worker"]["resources"] == {gpu.resource_name: gpu.slots}
    assert not any(k.startswith("qalloc_") for k in types["head"]["resources"])   # the head hosts none
    assert types["cpu_worker"]["min_workers"] >= 1 and types["gpu_worker"]["min_workers"] == 0
    for name in ("cpu_worker", "gpu_worker"):
        assert types[name]["max_workers"] >= max(types[name]["min_workers"], 1)
    assert sum(types[n]["max_workers"] for n in ("cpu_worker", "gpu_worker")) <= _config()["max_workers"]
    assert 0 < _config()["idle_timeout_minutes"] <= 60


def test_setup_installs_the_package_from_the_lock_on_every_node():
    cfg = _config()
    common = " ".join(cfg["setup_commands"])
    gpu = " ".join(cfg["available_node_types"]["gpu_worker"]["worker_setup_commands"])
    for cmds in (common, gpu):   # a node type's own list replaces the common one
        assert "-r ~/ray-qalloc/requirements.lock" in cmds and "--no-deps ~/ray-qalloc" in cmds
    lock = (REPO / "requirements.lock").read_text()
    aer = re.search(r"^qiskit-aer==(\S+)$", lock, re.M)
    assert aer and f"qiskit-aer-gpu=={aer.group(1)}" in gpu   # the CUDA build of the pinned Aer
    ray_pin = re.search(r"^ray==(\S+)$", lock, re.M)
    assert ray_pin and f"rayproject/ray:{ray_pin.group(1)}-py311" in cfg["docker"]["image"]
    assert cfg["file_mounts"]["~/ray-qalloc"] == "." and ".gitignore" in cfg["rsync_filter"]


def test_start_commands_start_ray_with_auth_and_serve_on_the_head():
    cfg = _config()
    head = " ".join(cfg["head_start_ray_commands"])
    worker = " ".join(cfg["worker_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    for cmds in (head, worker):
        assert "RAY_AUTH_MODE=token" in cmds and ". ~/qalloc.env" in cmds
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    assert "serve deploy serve/config.yaml" in head and "python -m ray_qalloc.autoscale wait" in head
    serve_cfg = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    assert serve_cfg["applications"][0]["import_path"] == "ray_qalloc.serving:app_builder"
    # every backend the pool names is one the registry can build
    from ray_qalloc.allocator import pool_names
    from ray_qalloc.backends.registry import make_backend

    pools = set(re.findall(r"QALLOC_POOL=(\S+)", head + " " + worker))
    assert pools >= {"default", f"default,{GPU_BACKEND}"}
    for pool in pools:
        for name in pool_names(pool.split(",")) + [GPU_BACKEND]:
            make_backend(name)


# ---- autoscaling on Ray's fake multinode provider -------------------------------------------------
def test_request_launches_the_missing_node_type_and_clear_gives_it_back(tmp_path):
    """Queued jobs that only the GPU backend can run make the autoscaler launch a gpu_worker
    (and no cpu_worker); clearing the request lets the idle node go. Then the head's
    `python -m ray_qalloc.autoscale wait` brings up the CPU pool's node."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(Path(__file__)), str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:   # SIGTERM: the child still stops its cluster, then fails
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    out = stdout + stderr
    assert proc.returncode == 0, out[-6000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["launched"] == [f"qalloc_backend_{GPU_BACKEND}"], report
    assert report["cpu_worker_launched"] is False, report
    assert report["removed"] is True, report
    assert report["wait_cli"] == [0, f"ready: {next(iter(_cpu_pool_resources()))}"], report
    assert report["cpu_worker_after_wait"] is True and report["cpu_worker_removed"] is True, report
    assert report["elastic_waiting"] is True, report
    assert report["elastic_job"] == [ELASTIC_BACKEND, 50] and report["elastic_node"] is True, report
    assert report["elastic_node_removed"] is True, report
    assert report["leftover_pids"] == [], report
    print(f"fake autoscaling cluster: {report['timeline']} (test {time.monotonic() - t0:.1f} s)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _fake_config(gcs_address: str) -> dict[str, Any]:
    """cluster.yaml's node types on the fake provider: same custom resources, one CPU each
    (the GPU type declares a GPU too: a resource count, no device is touched), min 0."""
    real = _config()
    types = real["available_node_types"]
    fake_types: dict[str, Any] = {
        "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
    }
    for name in ("cpu_worker", "gpu_worker"):
        res = {"CPU": 1, **types[name]["resources"]}
        if name == "gpu_worker":
            res["GPU"] = 1
        fake_types[name] = {"resources": res, "node_config": {}, "min_workers": 0, "max_workers": 1}
    return {
        "cluster_name": "qalloc-fake", "max_workers": 2, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.05,                 # 3 s: the give-back is seen quickly
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": fake_types, "head_node_type": "ray.head.default",
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def _poll(pred, timeout_s: float, every_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every_s)
    return pred()


def _ours(head: subprocess.Popen, temp_dir: str) -> list[Any]:
    """The processes this run started: the head's tree, and any that name our temp dir."""
    import psutil

    found: dict[int, Any] = {}
    if head.poll() is None:   # once reaped, its pid may belong to someone else
        try:
            p = psutil.Process(head.pid)
            for q in [p, *p.children(recursive=True)]:
                found[q.pid] = q
        except psutil.NoSuchProcess:
            pass
    for q in psutil.process_iter(["pid", "cmdline"]):
        try:
            if q.info["pid"] != os.getpid() and any(temp_dir in a for a in (q.info["cmdline"] or [])):
                found[q.pid] = q
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(found.values())


def _stop(head: subprocess.Popen, temp_dir: str) -> list[int]:
    """SIGTERM the `ray start --block` process (it stops its node), then kill what is left of
    ours by pid, looking again until nothing is left (a node the autoscaler was launching
    during the stop starts after the first look). Returns the pids still running at the end."""
    import psutil

    def running(q: Any) -> bool:
        try:
            return q.is_running() and q.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    procs = _ours(head, temp_dir)
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
    psutil.wait_procs(procs, timeout=20)
    try:
        head.wait(timeout=10)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait(timeout=10)
    for _ in range(5):
        left = [q for q in _ours(head, temp_dir) if running(q)]
        if not left:
            return []
        for q in left:
            try:
                q.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=5)
        time.sleep(1)
    return [q.pid for q in _ours(head, temp_dir) if running(q)]


def _fake_cluster_main(work: Path) -> dict[str, Any]:
    """Child process: start the fake autoscaling cluster, drive ray_qalloc.autoscale, report."""
    # Token authentication on, with this cluster's own token: the head, the nodes the
    # autoscaler starts (they inherit the head's environment) and this driver all present it.
    # Set before Ray is imported: Ray reads the mode once per process.
    token = work / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
    import ray
    from ray._private.services import get_node_ip_address

    from ray_qalloc import autoscale
    from ray_qalloc.backends.base import resource_name

    t0 = time.monotonic()
    timeline: dict[str, float] = {}

    def mark(what: str) -> None:
        timeline[what] = round(time.monotonic() - t0, 1)

    temp_dir = tempfile.mkdtemp(prefix="qf", dir="/tmp")   # Ray's unix sockets need a short path
    port = _free_port()
    address = f"{get_node_ip_address()}:{port}"
    cfg_path = work / "fake-cluster.json"
    cfg_path.write_text(json.dumps(_fake_config(address)))
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_bin, "start", "--head", "--block", f"--autoscaling-config={cfg_path}", f"--port={port}",
           "--num-cpus=1", "--num-gpus=0", "--include-dashboard=false", f"--temp-dir={temp_dir}",
           # the head hosts one backend: the cluster declares qalloc resources, so a pool backend
           # no node offers is elastic (the allocator phase below)
           '--resources={"%s": 1}' % resource_name(HEAD_BACKEND),
           f"--ray-client-server-port={_free_port()}", "--dashboard-agent-listen-port=0",
           "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats"]
    # RAY_FAKE_CLUSTER: the fake provider refuses to run without it; the update interval makes
    # the autoscaler look every second instead of every five.
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(work / "head.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    report: dict[str, Any] = {"launched": [], "cpu_worker_launched": None, "removed": False}
    gpu_res = resource_name(GPU_BACKEND)
    cpu_res = next(iter(_cpu_pool_resources()))
    try:
        addr_file = Path(temp_dir) / "ray_current_cluster"
        if not _poll(lambda: addr_file.exists() or head.poll() is not None, 90):
            raise RuntimeError("the head did not start in 90 s")
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited {head.returncode}: {(work / 'head.log').read_text()[-3000:]}")
        mark("head_up")
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        before = ray.cluster_resources()
        assert gpu_res not in before and cpu_res not in before, before

        # Two queued jobs that only the GPU statevector can run (the CPU pool's node type is
        # scaled to zero here, so a job that a CPU simulator could run would ask for it too).
        waiting = [[GPU_BACKEND], [GPU_BACKEND]]
        req = autoscale.Requester()
        bundles = req.update(waiting, before)
        assert bundles == [{gpu_res: 1.0}], bundles
        mark("requested")
        if not _poll(lambda: ray.cluster_resources().get(gpu_res, 0) >= 1, 120):
            raise RuntimeError(f"no gpu_worker after 120 s: {ray.cluster_resources()}")
        mark("gpu_worker_up")
        now = ray.cluster_resources()
        report["launched"] = sorted(k for k in now if k.startswith("qalloc_") and k not in before)
        report["cpu_worker_launched"] = cpu_res in now

        # A job placed by that resource runs on the new node.
        @ray.remote(num_cpus=0, resources={gpu_res: 1})
        def where() -> str:
            return ray.get_runtime_context().get_node_id()

        head_node = ray.get_runtime_context().get_node_id()
        assert ray.get(where.remote(), timeout=60) != head_node
        mark("ran_on_gpu_worker")
        # While jobs still wait for it, the request holds (the node is not released early).
        assert req.update(waiting) == [{gpu_res: 1.0}]

        # The queue drained: the request is cleared and the idle node is given back.
        assert req.update([]) == []
        mark("cleared")
        report["removed"] = _poll(lambda: ray.cluster_resources().get(gpu_res, 0) == 0, 120)
        mark("gpu_worker_gone")

        # The head's start command: wait for the CPU pool's node before deploying Serve.
        waited = subprocess.run([sys.executable, "-m", "ray_qalloc.autoscale", "wait", "--address", address,
                                 "--timeout", "120", cpu_res], cwd=REPO, capture_output=True, text=True,
                                timeout=180)
        report["wait_cli"] = [waited.returncode, waited.stdout.strip()[-200:] or waited.stderr[-2000:]]
        report["cpu_worker_after_wait"] = ray.cluster_resources().get(cpu_res, 0) >= 1
        mark("cpu_worker_up_after_wait")
        # `wait` cleared its request too: that node goes once idle (and the stop is quicker).
        report["cpu_worker_removed"] = _poll(lambda: ray.cluster_resources().get(cpu_res, 0) == 0, 60)
        mark("cpu_worker_gone")

        # The allocator does it by itself: a queued job that only a backend no node offers can
        # run makes it request that node type; the backend starts on the new node and runs the
        # job; once idle the backend is stopped, the request cleared, and the node given back.
        from ray_qalloc import connect
        from ray_qalloc.config import load_settings

        qa = connect(settings=load_settings(data_dir=work / "qalloc", pool=[HEAD_BACKEND, ELASTIC_BACKEND],
                                            health_interval_s=0.5, elastic_idle_s=4.0))
        rows = {b["name"]: b for b in qa.backends()}
        report["elastic_waiting"] = rows[ELASTIC_BACKEND]["elastic"] and not rows[ELASTIC_BACKEND]["started"]
        mark("allocator_up")
        bell = ('OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\ncreg c[2];\nh q[0];\ncx q[0],q[1];\n'
                "measure q -> c;\n")
        job = qa.submit(bell, shots=50, backends=[ELASTIC_BACKEND])
        res = job.result(timeout=150)
        report["elastic_job"] = [res.backend, sum(res.counts.values())]
        rows = {b["name"]: b for b in qa.backends()}
        report["elastic_node"] = rows[ELASTIC_BACKEND]["node_id"] != head_node
        mark("elastic_job_done")
        report["elastic_node_removed"] = _poll(lambda: ray.cluster_resources().get(
            resource_name(ELASTIC_BACKEND), 0) == 0, 120)
        mark("elastic_node_gone")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        report["leftover_pids"] = _stop(head, temp_dir)
        log.close()
        mark("stopped")
        report["timeline"] = timeline
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)
    return report


if __name__ == "__main__":
    # Stopped by the test on a timeout: unwind through the `finally` that stops the cluster.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))
    work_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="qalloc-fake-"))
    result = _fake_cluster_main(work_dir)
    print(json.dumps(result))
