"""cluster.yaml against the installed Ray's cluster-config schema, and autoscaling on Ray's
fake multinode provider: a request for a resource the cluster lacks launches the node type
that offers it, and clearing the request gives the idle node back; the allocator does it by
itself for a simulator pool (a placeholder pool while no node offers ``qalloc_pool_cpu``, the
real pool once one joins, stopped again once idle so the node can go).

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
POOL_CPU = "qalloc_pool_cpu"           # a node that offers it gets one simulator pool
POOL_GPU = "qalloc_pool_gpu"           # the GPU pool's resource (the GPU pool is a later issue)
HEAD_QPU = "qpu_fez"                   # the fake cluster's head offers this QPU, and no pool
ELASTIC_METHOD = "statevector"         # a job allowed only on this method waits for a pool


def _config() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _default_resources() -> dict[str, float]:
    """What the default configuration needs of the cluster: a pool, and each QPU's slots."""
    from ray_qalloc.config import load_settings
    from ray_qalloc.resources import node_resources

    return node_resources(load_settings(environ={}, pool=["default"]))


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


def test_node_types_declare_the_executors_they_host():
    """cpu_worker: one simulator pool; gpu_worker: the GPU pool's resource; the head: the API
    (``qalloc_head``, which keeps Serve replicas there) and every QPU of the default pool."""
    types = _config()["available_node_types"]
    assert types["cpu_worker"]["resources"] == {POOL_CPU: 1}
    assert types["gpu_worker"]["resources"] == {POOL_GPU: 1}
    needed = _default_resources()
    qpus = {k: v for k, v in needed.items() if k != POOL_CPU}
    assert qpus and all(k.startswith("qalloc_backend_qpu_") for k in qpus), needed
    assert types["head"]["resources"] == {"qalloc_head": 1, **qpus}
    assert not any(k.startswith("qalloc_pool_") for k in types["head"]["resources"])   # no pool there
    # the cluster offers everything the default configuration needs, the pool from its workers
    offered = {k for t in types.values() for k in t["resources"]}
    assert set(needed) <= offered
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
    # every QPU the pool names is one the registry can build; its methods run on the pools
    from ray_qalloc.backends.registry import make_backend
    from ray_qalloc.config import load_settings
    from ray_qalloc.resources import split_pool

    pools = set(re.findall(r"QALLOC_POOL=(\S+)", head + " " + worker))
    assert pools == {"default"}
    for pool in pools:
        methods, backends = split_pool(pool.split(","))
        assert methods and backends
        for name in backends:
            make_backend(name)
    # the API's replicas stay on the head (spot workers come and go): the settings say so, and
    # the head offers the resource they ask for
    replica = set(re.findall(r"QALLOC_API__REPLICA_RESOURCES='([^']+)'", head + " " + worker))
    assert len(replica) == 1
    settings = load_settings(environ={"QALLOC_API__REPLICA_RESOURCES": replica.pop()})
    assert set(settings.api.replica_resources) == {"qalloc_head"}
    assert "qalloc_head" in cfg["available_node_types"]["head"]["resources"]


# ---- the fleet's elastic pools, without Ray ------------------------------------------------------
class _Listener:
    """Records what the fleet tells the dispatcher."""

    def __init__(self) -> None:
        self.added: list[str] = []
        self.health: list[tuple[str, bool]] = []
        self.replans = 0

    def member_health(self, name: str, healthy: bool) -> None:
        self.health.append((name, healthy))

    def members_added(self, members: list[Any]) -> None:
        self.added += [m.spec.name for m in members]

    def host_unreachable(self, host: Any, why: str) -> None:
        pass

    def replan_queued(self) -> None:
        self.replans += 1


class _Call:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)   # a coroutine: the fleet awaits it like an ObjectRef


class _FakePool:
    def __init__(self, node_id: str) -> None:
        self.node_id, self.running = node_id, 0

        async def ping() -> dict[str, Any]:
            return {"node_id": self.node_id, "cores": 2.0, "memory_bytes": 2**33, "running": self.running}

        async def warmed(timeout_s: float = 60.0) -> bool:
            return True

        self.ping, self.warmed = _Call(ping), _Call(warmed)


def test_an_idle_elastic_pool_is_stopped_and_the_placeholder_comes_back(tmp_path, monkeypatch):
    """The fleet's side of scale-to-zero: a pool found while the fleet is elastic takes the
    placeholder's place; idle past ``elastic_idle_s`` its actor is killed, its members leave
    placement, the placeholder is back, and its node gets no new pool until a job wants one."""
    import asyncio

    import ray

    from ray_qalloc import fleet as fleet_mod
    from ray_qalloc.backends.pools import pool_name
    from ray_qalloc.config import load_settings

    killed: list[Any] = []
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: killed.append((actor, no_restart)))
    node = "ab12cd34" + "0" * 48
    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": node, "Alive": True,
                                                "Resources": {"CPU": 2.0, POOL_CPU: 1.0}}])
    settings = load_settings(environ={}, data_dir=tmp_path, pool=["statevector", "mps"], elastic_idle_s=5.0)
    listener = _Listener()
    f = fleet_mod.Fleet(settings, listener)
    # what start() makes of a declared cluster without a pool
    f._declared = f.elastic_pools = True
    f.hosts[fleet_mod.ELASTIC_POOL] = fleet_mod.Host(fleet_mod.ELASTIC_POOL, "pool", None, elastic=True)
    f._add_members(f.hosts[fleet_mod.ELASTIC_POOL], f._placeholder_specs())
    f._announced.update(f.members)
    placeholder = sorted(f.members)
    assert placeholder == [f"{fleet_mod.ELASTIC_POOL}/mps", f"{fleet_mod.ELASTIC_POOL}/statevector"]

    # a node joined: its pool (elastic, like the fleet) answers and replaces the placeholder
    name = pool_name(node)
    actor = _FakePool(node)
    host = fleet_mod.Host(name, "pool", actor, node_id=node, elastic=True, last_used=time.time())
    f.hosts[name] = host
    asyncio.run(f.probe(host, first=True))
    assert sorted(f.members) == sorted([f"{name}/mps", f"{name}/statevector", f"{name}/statevector@2"])
    assert sorted(listener.added) == sorted(f.members) and host.healthy
    assert all((p, False) in listener.health for p in placeholder)

    # busy (a run in flight, or a queued job wants it): kept, however long ago it was started
    host.last_used = time.time() - 60
    f.elastic_tick(set(), {f"{name}/mps"}, {})
    assert name in f.hosts and not killed
    host.last_used, host.running = time.time() - 60, 1
    f.elastic_tick(set(), set(), {})
    assert name in f.hosts and not killed
    host.running = 0

    # idle: stopped, its members out of placement, the placeholder back (re-planned, not re-added)
    host.last_used = time.time() - 60
    listener.added.clear()
    f.elastic_tick(set(), set(), {})
    assert killed == [(actor, True)] and name not in f.hosts
    assert sorted(f.members) == placeholder and listener.added == [] and listener.replans == 1
    assert (f"{name}/mps", False) in listener.health
    # the node is not given a pool again while it waits to be given back ...
    assert f.discover_pools() == []
    # ... unless a queued job wants a pool: then it may serve again
    f.elastic_tick({f"{fleet_mod.ELASTIC_POOL}/statevector"}, set(), {})
    assert f._retired == set()


def test_jobs_waiting_for_different_methods_of_a_pool_ask_for_one_node():
    """Every member of a pool needs the same node resource: one bundle, not one per method."""
    from ray_qalloc import autoscale
    from ray_qalloc.backends.base import resource_name

    def resource_of(b: str) -> str:
        return POOL_CPU if b.startswith("cpu-") else resource_name(b)

    waiting = [["cpu-elastic/statevector"], ["cpu-elastic/mps"], ["cpu-elastic/statevector@2"], [HEAD_QPU]]
    assert autoscale.bundles_to_request(waiting, {}, resource_of=resource_of) == [
        {POOL_CPU: 1.0}, {resource_name(HEAD_QPU): 1.0}]
    assert autoscale.bundles_to_request(waiting, {}, resource_of=resource_of, max_per_backend=2) == [
        {POOL_CPU: 1.0}, {POOL_CPU: 1.0}, {resource_name(HEAD_QPU): 1.0}]


# ---- autoscaling on Ray's fake multinode provider -------------------------------------------------
def test_request_launches_the_missing_node_type_and_clear_gives_it_back(tmp_path):
    """Queued jobs that only a GPU pool can run make the autoscaler launch a gpu_worker (and no
    cpu_worker); clearing the request lets the idle node go. Then the head's
    `python -m ray_qalloc.autoscale wait` brings up a cpu_worker. Then the allocator by itself:
    its placeholder pool makes it ask for `qalloc_pool_cpu`, the pool found on the new node runs
    the queued job, and once idle the pool is stopped and the node given back."""
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
    assert report["launched"] == [POOL_GPU], report
    assert report["gpu_bundles"] == [{POOL_GPU: 1.0}], report
    assert report["cpu_worker_launched"] is False, report
    assert report["removed"] is True, report
    assert report["wait_cli"] == [0, f"ready: {POOL_CPU}"], report
    assert report["cpu_worker_after_wait"] is True and report["cpu_worker_removed"] is True, report
    # the allocator: a placeholder pool at first, its members unhealthy (jobs wait for them)
    ph = report["placeholder"]
    assert ph["pools"] == ["cpu-elastic"] and ph["members"] and not ph["healthy"] and not ph["started"], report
    assert report["queued_state"] == "queued", report
    assert report["elastic_request"] == [{POOL_CPU: 1.0}], report
    # the pool found on the autoscaled node replaced it and ran the queued job, once
    assert report["pools_while_running"] == [f"cpu-{report['elastic_node'][:8]}"], report
    assert report["elastic_node"] != report["head_node"], report
    assert report["elastic_job"] == [f"cpu-{report['elastic_node'][:8]}/{ELASTIC_METHOD}", 50], report
    assert report["elastic_attempts"] == ["completed"], report
    # idle: the pool was stopped, the placeholder is back, the request cleared, the node gone
    assert report["pools_after_idle"] == ["cpu-elastic"], report
    assert report["request_after_idle"] == [], report
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
           # the head hosts a QPU and no pool: the cluster declares qalloc resources, so while no
           # node offers qalloc_pool_cpu the allocator plans with a placeholder pool (below)
           '--resources={"%s": 1}' % resource_name(HEAD_QPU),
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
    gpu_res, cpu_res = POOL_GPU, POOL_CPU
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

        # Two queued jobs that only a GPU pool's methods can run (the CPU pool's node type is
        # scaled to zero here, so a job that a CPU simulator could run would ask for it too):
        # members of one pool need one node of its type, whatever method each job waits for.
        waiting = [["gpu-elastic/statevector"], ["gpu-elastic/tensor_network"]]
        req = autoscale.Requester(resource_of=lambda b: gpu_res if b.startswith("gpu-") else resource_name(b))
        bundles = req.update(waiting, before)
        report["gpu_bundles"] = bundles
        assert bundles == [{gpu_res: 1.0}], bundles
        mark("requested")
        if not _poll(lambda: ray.cluster_resources().get(gpu_res, 0) >= 1, 120):
            raise RuntimeError(f"no gpu_worker after 120 s: {ray.cluster_resources()}")
        mark("gpu_worker_up")
        now = ray.cluster_resources()
        report["launched"] = sorted(k for k in now if k.startswith("qalloc_") and k not in before)
        report["cpu_worker_launched"] = cpu_res in now

        # A task placed by that resource runs on the new node.
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

        # The allocator does it by itself. No node offers a pool: it plans with a placeholder
        # pool (members unhealthy), so a simulator job waits, queued, and the allocator asks for
        # `qalloc_pool_cpu`; the autoscaler brings a cpu_worker; the allocator's health tick
        # finds it and starts a pool there (elastic: the fleet had none at start), the queued
        # job is re-planned onto it and runs; once idle the pool is stopped, the placeholder is
        # back, the request is cleared, and the node is given back.
        from ray_qalloc import connect
        from ray_qalloc.config import load_settings

        report["head_node"] = head_node
        qa = connect(settings=load_settings(data_dir=work / "qalloc", pool=[ELASTIC_METHOD, HEAD_QPU],
                                            health_interval_s=0.5, elastic_idle_s=4.0))

        def pools() -> list[str]:
            return sorted({b["pool"] for b in qa.backends() if b["pool"]})

        def request() -> Any:
            return ray.get(qa.allocator.__ray_call__.remote(lambda self: self._autoscale.current), timeout=30)

        rows = [b for b in qa.backends() if b["pool"]]
        report["placeholder"] = {"pools": pools(), "members": [b["name"] for b in rows],
                                 "healthy": any(b["healthy"] for b in rows),
                                 "started": any(b["started"] for b in rows)}
        mark("allocator_up")
        bell = ('OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\ncreg c[2];\nh q[0];\ncx q[0],q[1];\n'
                "measure q -> c;\n")
        job = qa.submit(bell, shots=50, backends=[ELASTIC_METHOD])
        report["queued_state"] = job.status()["state"]
        _poll(lambda: bool(request()), 30)
        report["elastic_request"] = request()
        mark("pool_requested")
        res = job.result(timeout=150)
        mark("elastic_job_done")
        report["elastic_job"] = [res.backend, sum(res.counts.values())]
        report["elastic_node"] = res.metadata.get("node_id")
        report["elastic_attempts"] = [a["outcome"] for a in job.status()["attempt_history"]]
        report["pools_while_running"] = pools()
        # idle for elastic_idle_s: the pool is stopped and the placeholder comes back
        _poll(lambda: pools() == ["cpu-elastic"], 60)
        report["pools_after_idle"] = pools()
        report["request_after_idle"] = request()
        mark("elastic_pool_stopped")
        report["elastic_node_removed"] = _poll(lambda: ray.cluster_resources().get(cpu_res, 0) == 0, 120)
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
