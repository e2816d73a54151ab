"""Run every benchmark in ``benchmarks/`` and collect their JSON into ``results/all.json``.

    python -m benchmarks.run_all [--quick] [--only NAME ...] [--skip NAME ...] [--timeout 900]
    python -m benchmarks.run_all --collect-only     # gather results/<name>.json into all.json

``make bench`` calls this. Each benchmark runs as ``python -m benchmarks.<name> <args>`` in its
own process (one at a time: they are timing runs), with the arguments listed in ``BENCHMARKS``
(``--quick`` switches to each one's smoke arguments). Scripts found in the folder but not listed
run with no arguments. A listed script that does not exist is reported as ``missing`` and
skipped; a failing or timed-out one is reported with the tail of its stderr, and the others
still run. The JSON a benchmark prints on stdout is stored under its name in ``all.json``
(and as ``results/<name>.json`` for the scripts that do not write one themselves).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import DEFAULT_OUT, environment

__all__ = [
    "BENCHMARKS",
    "discover",
    "accepts_out",
    "parse_json_output",
    "plot_stdout_only",
    "run_one",
    "run",
    "main",
]

log = logging.getLogger("benchmarks.run_all")

HERE = Path(__file__).resolve().parent
# files in benchmarks/ that are not benchmarks
NOT_BENCHMARKS = frozenset({"__init__", "common", "run_all", "_fusion_model"})

# name -> (full-run arguments, --quick arguments); the order is the run order
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "roofline": ([], ["--quick"]),
    "fusion_cpu": ([], ["--repeats", "5"]),
    "rerank_cost": ([], ["--quick"]),
    "store_get": ([], ["--videos", "1000", "--calls", "200"]),
    "grpc_rerank": ([], ["--quick"]),
    "search_e2e": ([], ["--quick"]),
    "ingest_throughput": ([], ["--quick"]),
    "sidecar_memory": ([], ["--quick"]),
    "one_to_one_vs_many": ([], ["--quick"]),
    "two_stage_vs_exhaustive": ([], ["--quick"]),
}


def discover(folder: Path = HERE) -> list[str]:
    """Benchmark module names: the listed ones first (in order), then any other script."""
    present = {p.stem for p in folder.glob("*.py") if p.stem not in NOT_BENCHMARKS}
    present = {name for name in present if not name.startswith("_")}
    return [*BENCHMARKS, *sorted(present - set(BENCHMARKS))]


def accepts_out(name: str, folder: Path = HERE) -> bool:
    """Whether ``benchmarks.<name>`` takes ``--out`` (it uses ``common.add_common_arguments``)."""
    path = folder / f"{name}.py"
    return path.exists() and "add_common_arguments(" in path.read_text()


def parse_json_output(stdout: str) -> Any:
    """The JSON document a benchmark printed: all of stdout, or else the last JSON object in it
    that starts a line (some scripts log before their result)."""
    text = stdout.strip()
    if not text:
        raise ValueError("no output on stdout")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    decoder = json.JSONDecoder()
    found: Any = None
    position = 0
    while True:
        start = text.find("{", position)
        if start < 0:
            break
        if start == 0 or text[start - 1] == "\n":
            try:
                found, end = decoder.raw_decode(text, start)
                position = end
                continue
            except json.JSONDecodeError:
                pass
        position = start + 1
    if found is None:
        raise ValueError("no JSON object on stdout")
    return found


def run_one(
    name: str, arguments: list[str], *, out_dir: Path, timeout: float, folder: Path = HERE
) -> dict[str, Any]:
    """Run ``benchmarks.<name>``; a dict with status, seconds, command and result (or error)."""
    command = [sys.executable, "-m", f"benchmarks.{name}", *arguments]
    if not (folder / f"{name}.py").exists():
        log.warning("benchmark %s: benchmarks/%s.py does not exist, skipped", name, name)
        return {"status": "missing", "command": " ".join(command[1:])}
    log.info("running %s", " ".join(command[1:]))
    started, wall_started = time.perf_counter(), time.time()
    entry: dict[str, Any] = {"command": " ".join(command[1:])}
    try:
        done = subprocess.run(
            command, cwd=folder.parent, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        entry.update(status="timeout", seconds=round(time.perf_counter() - started, 1))
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        entry["error"] = f"timed out after {timeout:.0f} s; stderr tail: {stderr[-1500:]}"
        return entry
    entry["seconds"] = round(time.perf_counter() - started, 1)
    if done.returncode != 0:
        entry.update(status="failed", returncode=done.returncode, error=done.stderr[-3000:])
        log.error("benchmark %s failed (exit %d)", name, done.returncode)
        return entry
    try:
        entry["result"] = parse_json_output(done.stdout)
    except ValueError as exc:
        entry.update(status="failed", error=f"{exc}; stdout tail: {done.stdout[-1500:]}")
        return entry
    entry["status"] = "ok"
    own = out_dir / f"{name}.json"
    if not own.exists() or own.stat().st_mtime < wall_started:
        # the script does not write its own results file: keep what it printed
        out_dir.mkdir(parents=True, exist_ok=True)
        own.write_text(json.dumps(entry["result"], indent=2) + "\n")
    return entry


def plot_stdout_only(name: str, result: Any, out_dir: Path) -> Path | None:
    """A PNG for the scripts that print JSON but draw nothing (``fusion_cpu``); else None."""
    from benchmarks.common import plot_bars

    if name != "fusion_cpu" or not isinstance(result, dict) or "results" not in result:
        return None
    rows = result["results"]
    groups = sorted({f"{r['head']}\nbatch {r['batch']}" for r in rows})
    series = {
        kv: [
            next(
                r["ms_per_query"]
                for r in rows
                if r["kv"] == kv and f"{r['head']}\nbatch {r['batch']}" == group
            )
            for group in groups
        ]
        for kv in ("direct", "cached")
    }
    return plot_bars(
        out_dir / "fusion_cpu.png",
        groups,
        {f"K/V {kv}": values for kv, values in series.items()},
        title=f"Fusion CPU cost (K={result.get('K')}, T={result.get('T')}, D={result.get('D')})",
        ylabel="ms per query (log)",
        logy=True,
    )


def collect_existing(name: str, out_dir: Path) -> dict[str, Any]:
    """The entry of an earlier run: ``<out_dir>/<name>.json`` as it is (``--collect-only``)."""
    path = out_dir / f"{name}.json"
    if not path.exists():
        return {"status": "missing", "error": f"no {path.name} in {out_dir}"}
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        return {"status": "failed", "error": f"{path.name}: {exc}"}
    written = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(path.stat().st_mtime))
    return {"status": "ok", "collected_from": path.name, "written": written, "result": result}


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = discover()
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            raise SystemExit(f"unknown benchmark(s): {', '.join(unknown)} (have {names})")
        names = [n for n in names if n in args.only]
    names = [n for n in names if n not in (args.skip or [])]
    started = time.perf_counter()
    collected: dict[str, Any] = {}
    for name in names:
        if args.collect_only:
            collected[name] = collect_existing(name, args.out)
            continue
        full, quick = BENCHMARKS.get(name, ([], []))
        arguments = list(quick if args.quick else full)
        if args.out != DEFAULT_OUT and accepts_out(name):
            arguments += ["--out", str(args.out)]
        collected[name] = run_one(name, arguments, out_dir=args.out, timeout=args.timeout)
        if collected[name]["status"] == "ok" and not (args.out / f"{name}.png").exists():
            try:
                plot_stdout_only(name, collected[name]["result"], args.out)
            except (KeyError, StopIteration, TypeError, ValueError):
                log.warning("could not plot %s", name, exc_info=True)
        log.info("%s: %s in %s s", name, collected[name]["status"], collected[name].get("seconds"))
    summary = {
        "benchmark": "all",
        "quick": args.quick,
        "collect_only": args.collect_only,
        "statuses": {name: entry["status"] for name, entry in collected.items()},
        "seconds": round(time.perf_counter() - started, 1),
        "environment": environment(),
        "benchmarks": collected,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "all.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each benchmark's smoke arguments")
    parser.add_argument("--only", nargs="+", default=None, help="run only these benchmarks")
    parser.add_argument("--skip", nargs="+", default=None, help="do not run these")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per benchmark")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument(
        "--collect-only",
        action="store_true",
        help="run nothing: gather the <out>/<name>.json files of earlier runs into all.json",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    summary = run(args)
    print(json.dumps({k: v for k, v in summary.items() if k != "benchmarks"}, indent=2))
    failed = [n for n, s in summary["statuses"].items() if s in ("failed", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
