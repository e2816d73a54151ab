"""Resident memory (VmRSS, VmHWM) of a ``tb serve`` sidecar, stage by stage, and after N calls.

    python -m benchmarks.sidecar_memory [--quick] [--calls 500] [--videos 2000]
                                        [--model tiny|d512]

Saves a TokenBinder checkpoint and an LMDB frame-token store of ``--videos`` videos, starts
``tb serve --no-search`` as a real child process on a free loopback port, waits until it
answers, reads ``/proc/<pid>/status`` (VmRSS, VmHWM) idle, then sends ``--calls`` Rerank calls
(K = 10 candidates each, sliding over the stored ids so that the K/V cache fills) through
``RemoteReranker`` and reads it again. Prints one JSON document; writes
``sidecar_memory.json/.png``. Linux only (``/proc``).

``stages_rss_mib`` splits the figure: ``import_torch`` (a bare ``import torch``),
``server_modules`` (then the modules ``tb serve`` imports before it loads anything: the CLI,
``server.app``, ``server.http``), ``model_loaded`` (the sidecar answering, idle) and ``served``
(after the calls). ``top_mappings_mib`` is the sidecar's resident memory by mapped file
(``/proc/<pid>/smaps``; ``[anon]`` is the heap and other anonymous memory) once served: which
shared libraries (torch, triton, grpc, ...) it holds.

Models: ``tiny`` (the offline test config, D 64, T 8) and ``d512`` (fusion at the paper's width,
D 512, T 12, m 4, with the tiny CLIP towers).
"""

from __future__ import annotations

import argparse
import copy
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import add_common_arguments, emit, environment, plot_lines

__all__ = [
    "read_proc_status",
    "import_stages",
    "top_mappings",
    "build_model",
    "prepare",
    "run",
    "main",
]

log = logging.getLogger("benchmarks.sidecar_memory")

TOP_K = 10  # candidates per Rerank call


def read_proc_status(pid: int) -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of ``pid`` in MiB, from ``/proc/<pid>/status``."""
    values: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = round(int(rest.split()[0]) / 1024.0, 1)  # kB -> MiB
    if "VmHWM" not in values:
        raise RuntimeError(f"/proc/{pid}/status has no VmHWM")
    return values


def build_model(kind: str) -> Any:
    """``tiny``, ``d512`` or ``vit-b32`` random-init TokenBinder (eval), head made non-zero."""
    import torch

    from tb_reranker.model import TokenBinder, TokenBinderConfig
    from tb_reranker.model.config import TINY_CLIP_CFG

    if kind == "tiny":
        config = TokenBinderConfig.tiny()
    elif kind == "vit-b32":  # ViT-B/32's shapes (random weights: no download)
        config = TokenBinderConfig.vit_b_32(pretrained=None, top_k=TOP_K)
        model = TokenBinder(config, load_pretrained=False).eval()
        with torch.no_grad():
            torch.nn.init.normal_(model.fusion.head[-1].weight, std=0.02)
        return model
    elif kind == "d512":
        clip_cfg = copy.deepcopy(TINY_CLIP_CFG)
        clip_cfg["embed_dim"] = 512
        config = TokenBinderConfig.tiny(
            clip_cfg=clip_cfg, num_frames=12, num_indicators=4, top_k=TOP_K, fusion_heads=8
        )
    else:
        raise ValueError(f"unknown model {kind!r} (tiny, d512, vit-b32)")
    model = TokenBinder(config).eval()
    with torch.no_grad():
        last = model.fusion.head[-1]
        torch.nn.init.normal_(last.weight, std=0.02)
        torch.nn.init.normal_(last.bias, std=0.02)
    return model


def prepare(workdir: Path, kind: str, num_videos: int, seed: int) -> tuple[Any, list[str]]:
    """Checkpoint at ``workdir/ckpt`` and store at ``workdir/frames``; returns (model, ids)."""
    from tb_reranker.model import save_checkpoint
    from tb_reranker.stores import FrameRecord, open_store

    model = build_model(kind)
    save_checkpoint(model, workdir / "ckpt")
    rng = np.random.default_rng(seed)
    frames, dim = int(model.num_frames), int(model.embed_dim)
    ids = [f"vid-{n:06d}" for n in range(num_videos)]
    store = open_store(str(workdir / "frames"))
    try:
        for start in range(0, num_videos, 500):
            chunk = ids[start : start + 500]
            tokens = rng.standard_normal((len(chunk), frames, dim), dtype=np.float32)
            tokens /= np.linalg.norm(tokens, axis=-1, keepdims=True)
            store.put_many(
                {
                    video_id: FrameRecord(
                        tokens=tokens[n].astype(np.float16),
                        timestamps=np.arange(frames, dtype=np.float32) * 0.5,
                        content_hash=f"h{video_id}",
                    )
                    for n, video_id in enumerate(chunk)
                }
            )
    finally:
        store.close()
    return model, ids


_IMPORT_STAGES = """
import sys
def rss():
    with open('/proc/self/status') as status:
        for line in status:
            if line.startswith(('VmRSS', 'VmHWM')):
                print(line.split(':')[0], line.split()[1])
import torch
rss()
import tb_reranker.cli, tb_reranker.server.app, tb_reranker.server.http, tb_reranker.rerank
rss()
"""


def import_stages() -> dict[str, float]:
    """VmRSS after ``import torch`` and after the server modules, in a fresh interpreter (MiB),
    and the VmHWM of the latter (the import floor)."""
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_STAGES],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    pairs = [line.split() for line in out.stdout.splitlines() if line.startswith("Vm")]
    mib = [(key, round(int(kb) / 1024.0, 1)) for key, kb in pairs]
    rss = [value for key, value in mib if key == "VmRSS"]
    hwm = [value for key, value in mib if key == "VmHWM"]
    return {"import_torch": rss[0], "server_modules": rss[1], "import_floor_hwm": hwm[1]}


def top_mappings(pid: int, count: int = 8) -> dict[str, float]:
    """Resident MiB of ``pid`` by mapped file (anonymous memory as ``[anon]``), largest first."""
    totals: dict[str, int] = {}
    current = "[anon]"
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if fields and "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
                current = fields[5] if len(fields) > 5 and fields[5].startswith("/") else "[anon]"
            elif fields and fields[0] == "Rss:":
                totals[current] = totals.get(current, 0) + int(fields[1])
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:count]
    return {Path(name).name or name: round(kb / 1024.0, 1) for name, kb in ranked}


def _wait_ready(
    remote: Any, proc: subprocess.Popen[bytes], indicators: Any, ids: list[str]
) -> float:
    """Retry one Rerank until the sidecar answers; returns the seconds waited."""
    from tb_reranker.errors import TBError

    started = time.perf_counter()
    deadline = started + 120.0
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"tb serve exited with {proc.returncode} before answering")
        try:
            remote.rerank(indicators, [ids[:TOP_K]])
            return time.perf_counter() - started
        except TBError:
            if time.perf_counter() > deadline:
                raise
            time.sleep(0.2)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from milvus_setup.launcher import free_port
    from tb_reranker.remote import RemoteReranker

    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="tb_bench_sidecar_"))
    proc: subprocess.Popen[bytes] | None = None
    samples: list[tuple[int, dict[str, float]]] = []
    stages = import_stages()
    try:
        model, ids = prepare(workdir, args.model, args.videos, args.seed)
        m, dim = int(model.num_indicators), int(model.embed_dim)
        del model
        port = free_port()
        command = [
            sys.executable,
            "-m",
            "tb_reranker",
            "serve",
            "--port",
            str(port),
            "--no-search",
            "--checkpoint",
            str(workdir / "ckpt"),
            "--store",
            str(workdir / "frames"),
            "--data-dir",
            str(workdir / "tb_data"),
            "--device",
            "cpu",
        ]
        with open(workdir / "serve.log", "wb") as serve_log:  # the child keeps its own fd
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=serve_log)
        remote = RemoteReranker(f"127.0.0.1:{port}", timeout=30.0, retries=0)
        rng = np.random.default_rng(args.seed + 1)
        indicators = rng.standard_normal((1, m, dim), dtype=np.float32)
        indicators /= np.linalg.norm(indicators, axis=-1, keepdims=True)
        ready_s = _wait_ready(remote, proc, indicators, ids)
        idle = read_proc_status(proc.pid)
        samples.append((1, idle))
        step = max(1, args.calls // 10)
        t0 = time.perf_counter()
        for call in range(1, args.calls + 1):
            start = (call * TOP_K) % (len(ids) - TOP_K)
            queries = rng.standard_normal((1, m, dim), dtype=np.float32)
            queries /= np.linalg.norm(queries, axis=-1, keepdims=True)
            broad = sorted(rng.random(TOP_K).tolist(), reverse=True)
            results = remote.rerank(queries, [ids[start : start + TOP_K]], [broad])
            if len(results[0].candidates) != TOP_K:
                raise RuntimeError(f"call {call}: {len(results[0].candidates)} candidates back")
            if call % step == 0 or call == args.calls:
                samples.append((call + 1, read_proc_status(proc.pid)))
        calls_s = time.perf_counter() - t0
        info = remote.info()
        final = samples[-1][1]
        mappings = top_mappings(proc.pid)
        remote.close()
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    distinct = min(args.videos, args.calls * TOP_K)
    report: dict[str, Any] = {
        "benchmark": "sidecar_memory",
        "config": {
            "model": args.model,
            "embed_dim": dim,
            "videos": args.videos,
            "calls": args.calls,
            "top_k": TOP_K,
            "quick": args.quick,
        },
        "ready_s": round(ready_s, 2),
        "import_floor_hwm_mib": stages["import_floor_hwm"],
        "stages_rss_mib": {
            "import_torch": stages["import_torch"],
            "server_modules": stages["server_modules"],
            "model_loaded": idle["VmRSS"],
            "served": final["VmRSS"],
        },
        "top_mappings_mib": mappings,
        "idle_rss_mib": idle["VmRSS"],
        "idle_hwm_mib": idle["VmHWM"],
        "final_rss_mib": final["VmRSS"],
        "peak_rss_mib": final["VmHWM"],
        "growth_mib": round(final["VmHWM"] - idle["VmHWM"], 1),
        "distinct_videos_touched": distinct,
        "calls_per_s": round(args.calls / calls_s, 1),
        "server_info_cache": {k: v for k, v in info.items() if "cache" in k},
        "samples": [{"calls": c, **v} for c, v in samples],
        "seconds": round(time.perf_counter() - started, 1),
        "environment": environment(),
    }
    if not args.no_plot:
        path = plot_lines(
            args.out / "sidecar_memory.png",
            {
                "VmRSS": ([c for c, _ in samples], [v["VmRSS"] for _, v in samples]),
                "VmHWM (peak)": ([c for c, _ in samples], [v["VmHWM"] for _, v in samples]),
            },
            title=f"tb serve memory ({args.model} model, {args.videos} stored videos)",
            xlabel="Rerank calls served",
            ylabel="MiB",
        )
        report["plot"] = str(path)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--calls", type=int, default=None, help="Rerank calls to send")
    parser.add_argument("--videos", type=int, default=None, help="videos in the store")
    parser.add_argument(
        "--model", choices=("tiny", "d512", "vit-b32"), default="tiny", help="model"
    )
    args = parser.parse_args(argv)
    args.calls = args.calls or (30 if args.quick else 500)
    args.videos = args.videos or (200 if args.quick else 5000)
    if not sys.platform.startswith("linux"):
        parser.error("needs Linux /proc")
    if args.videos <= TOP_K or args.calls < 1:
        parser.error("--videos must exceed K (10) and --calls be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    emit("sidecar_memory", run(args), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
