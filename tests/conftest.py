"""Session-wide test settings."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run faster on one thread, and the 2-core machine also hosts Milvus and moto."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tb_exit_code():
    """``tb ARGV``'s exit status from ``cli.main``: its return value, or the status of the
    ``SystemExit`` argparse raises for a flag it refuses itself (a bad number is refused there,
    at the edge, since every numeric flag has a bounded type)."""
    from tb_reranker.cli import main

    def run(argv: list[str]) -> int:
        try:
            return main(argv)
        except SystemExit as exc:
            return exc.code

    return run
