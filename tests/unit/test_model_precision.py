"""One device/precision resolver: the configured dtype really decides the model's autocast.

Runs on CPU: ``bfloat16`` autocast works there too, so the plumbing from ``tb serve --dtype`` to
the matmuls is observable with forward hooks; CUDA requests on a machine without CUDA must be
refused with a typed error, not fail deep inside torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tb_reranker.errors import InvalidInputError
from tb_reranker.model import TokenBinder, TokenBinderConfig, save_checkpoint
from tb_reranker.model.precision import (
    autocast_dtype,
    check_precision,
    resolve_device,
    resolve_precision,
)

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


class _Dtypes:
    """Records the dtype of the first linear layer's output in the fusion's FFN and in the text
    tower's first block (the input of their activation modules): the matmuls autocast decides
    (the linear layers themselves may run on packed weights, not as module calls)."""

    def __init__(self, model: TokenBinder) -> None:
        self.fusion: list[torch.dtype] = []
        self.text: list[torch.dtype] = []
        fusion_act = model.fusion.blocks[0].mlp[1]
        text_act = model.clip.transformer.resblocks[0].mlp[1]
        self._handles = [
            fusion_act.register_forward_pre_hook(lambda _m, a: self.fusion.append(a[0].dtype)),
            text_act.register_forward_pre_hook(lambda _m, a: self.text.append(a[0].dtype)),
        ]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _run(model: TokenBinder) -> tuple[_Dtypes, torch.Tensor]:
    dtypes = _Dtypes(model)
    try:
        generator = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            indicators = model.encode_text(["a red cube then a blue ball", "a cat"])
            tokens = torch.randn(2, 3, model.num_frames, model.embed_dim, generator=generator)
            cls = torch.nn.functional.normalize(tokens.mean(2), dim=-1)
            scores = model.focused_scores(indicators, cls, tokens)
    finally:
        dtypes.close()
    return dtypes, scores.final


def test_resolve_device_and_precision_rules() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda", 0).type if torch.cuda.is_available() else "cpu"
    for auto in ("auto", None, "", "AUTO"):
        assert resolve_device(auto).type == expected
    with pytest.raises(InvalidInputError, match="invalid device 'gpu'"):
        resolve_device("gpu")
    assert resolve_precision("auto", torch.device("cpu")) == "float32"
    assert resolve_precision("auto", torch.device("cuda")) == "bfloat16"
    assert resolve_precision("bfloat16", torch.device("cpu")) == "bfloat16"
    assert resolve_precision("float32", torch.device("cuda")) == "float32"
    with pytest.raises(InvalidInputError, match="dtype must be one of auto, float32, bfloat16"):
        check_precision("float16")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("auto", cuda) is torch.bfloat16
    assert autocast_dtype("float32", cpu) is None and autocast_dtype("float32", cuda) is None
    assert autocast_dtype("bfloat16", cpu) is torch.bfloat16
    assert autocast_dtype("bfloat16", cuda) is torch.bfloat16


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_requested_without_cuda_is_a_typed_error(device: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="CUDA is not available"):
        resolve_device(device)
    with pytest.raises(InvalidInputError, match="CUDA is not available"):
        TokenBinder(TokenBinderConfig.tiny(), device=device)


@pytest.mark.parametrize("prepared", [False, True], ids=["plain", "prepared"])
def test_model_precision_decides_autocast_on_cpu(prepared: bool) -> None:
    model = TokenBinder(TokenBinderConfig.tiny())
    _randomise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        last = model.fusion.head[-1]
        last.weight.copy_(torch.randn(last.weight.shape, generator=_randomise))
    if prepared:  # packed layers: autocast takes their F.linear path
        model.prepare_for_inference()
    assert model.precision == "auto"
    auto, reference = _run(model)  # "auto" on CPU: no autocast
    assert set(auto.fusion) == set(auto.text) == {torch.float32}
    model.precision = "bfloat16"
    bf16, final = _run(model)
    assert set(bf16.fusion) == set(bf16.text) == {torch.bfloat16}
    assert final.dtype == torch.float32  # outputs stay float32
    assert not torch.equal(final, reference)  # really computed differently...
    torch.testing.assert_close(final, reference, atol=5e-2, rtol=5e-2)  # ...to bf16 accuracy
    model.precision = "float32"
    float32, again = _run(model)
    assert set(float32.fusion) == {torch.float32}
    assert torch.equal(again, reference)
    with pytest.raises(InvalidInputError, match="dtype must be one of"):
        model.precision = "fp16"
    assert model.precision == "float32"  # a refused value changes nothing


def _checkpoint_and_store(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    from tb_reranker.server.testing import build_tiny_components

    components, ids = build_tiny_components(tmp_path, num_videos=6)
    save_checkpoint(components.reranker.model, tmp_path / "checkpoint")
    components.reranker.store.close()
    return tmp_path / "checkpoint", tmp_path / "frames", ids


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--dtype", "bfloat16", "--device", "cpu"], "bfloat16"),
        (["--dtype", "float32", "--device", "cpu"], "float32"),
        (["--device", "cpu"], "float32"),  # auto on CPU
    ],
)
def test_serve_dtype_flag_reaches_the_model(flags, expected, tmp_path: Path) -> None:
    """``tb serve --dtype X`` -> ServerConfig -> load_components -> the model's autocast."""
    from tb_reranker.cli import build_parser
    from tb_reranker.config import Settings
    from tb_reranker.server.app import load_components
    from tb_reranker.server.config import ServerConfig

    checkpoint, store, ids = _checkpoint_and_store(tmp_path)
    args = build_parser().parse_args(["serve", *flags])
    config = ServerConfig.from_env(dtype=args.dtype, device=args.device)
    settings = Settings.from_env(checkpoint=str(checkpoint), store=str(store))
    components = load_components(settings, config)
    try:
        model = components.reranker.model
        assert components.device == "cpu" and components.dtype == expected
        assert model.precision == expected
        dtypes = _Dtypes(model)
        try:
            indicators = components.reranker.encode(["a red cube"])
            result = components.reranker.rerank(indicators, [ids[:4]])[0]
        finally:
            dtypes.close()
        assert len(result.candidates) == 4
        assert all(np.isfinite(c.score) for c in result.candidates)
        assert set(dtypes.fusion) == set(dtypes.text) == {getattr(torch, expected)}
    finally:
        components.reranker.store.close()


@no_cuda
def test_serve_and_client_refuse_cuda_without_cuda(tmp_path: Path) -> None:
    from tb_reranker.client import Client
    from tb_reranker.config import Settings
    from tb_reranker.server.app import load_components
    from tb_reranker.server.config import ServerConfig

    checkpoint, store, _ = _checkpoint_and_store(tmp_path)
    settings = Settings.from_env(checkpoint=str(checkpoint), store=str(store))
    with pytest.raises(InvalidInputError, match="CUDA is not available"):
        load_components(settings, ServerConfig(device="cuda"))
    client = Client(
        str(tmp_path / "milvus.db"), checkpoint=str(checkpoint), store=str(store), device="cuda"
    )
    try:
        with pytest.raises(InvalidInputError, match="CUDA is not available"):
            client.model  # noqa: B018 - the lazy model load is what is tested
    finally:
        client.close()


@pytest.mark.parametrize(
    ("flags", "cache_kv", "query_cache_size"),
    [([], False, 1024), (["--cache-kv", "--query-cache-size", "0"], True, 0)],
)
def test_serve_cache_flags_reach_the_components(flags, cache_kv, query_cache_size, tmp_path):
    """Issue 12: ``tb serve --cache-kv`` picks the K/V cache, ``--query-cache-size`` the
    Search LRU of encoded queries (0 = off)."""
    from tb_reranker.cli import build_parser
    from tb_reranker.cli.serve import _SERVER_FLAGS
    from tb_reranker.config import Settings
    from tb_reranker.server.app import load_components
    from tb_reranker.server.config import ServerConfig
    from tb_reranker.server.engine import ServingEngine

    checkpoint, store, ids = _checkpoint_and_store(tmp_path)
    args = build_parser().parse_args(["serve", *flags])
    names = (*_SERVER_FLAGS, "batching", "cache_kv")
    config = ServerConfig.from_env(**{name: getattr(args, name, None) for name in names})
    assert (config.cache_kv, config.query_cache_size) == (cache_kv, query_cache_size)
    assert ServingEngine(config).query_cache.capacity == query_cache_size
    components = load_components(
        Settings.from_env(checkpoint=str(checkpoint), store=str(store)), config
    )
    try:
        reranker = components.reranker
        assert reranker.cache_kv is cache_kv
        reranker.rerank(reranker.encode(["a red cube"]), [ids[:4]])
        assert reranker.cache.kv.shape[:2] == ((1, 2) if cache_kv else (1, 1))
    finally:
        components.reranker.store.close()


def test_padded_frames_under_bfloat16_autocast() -> None:
    """Masked projection and masked scoring run under bf16 autocast (the CUDA default) and stay
    close to float32; padded frames get no attention there either."""
    model = TokenBinder(TokenBinderConfig.tiny()).eval()
    generator = torch.Generator().manual_seed(3)
    tokens = torch.nn.functional.normalize(torch.randn(2, 3, 8, 64, generator=generator), dim=-1)
    cls = torch.nn.functional.normalize(tokens.mean(2), dim=-1)
    indicators = torch.nn.functional.normalize(torch.randn(2, 4, 64, generator=generator), dim=-1)
    mask = torch.ones(2, 3, 8, dtype=torch.bool)
    mask[0, 1, 5:] = False
    finals = {}
    for precision in ("float32", "bfloat16"):
        model.precision = precision
        with torch.inference_mode():
            kv = model.project_candidates(tokens.reshape(6, 8, 64), mask.reshape(6, 8))
            scores = model.focused_scores(
                indicators, cls, cand_kv=kv.view(2, 3, *kv.shape[1:]), frames_mask=mask
            )
            direct = model.focused_scores(indicators, cls, tokens, frames_mask=mask)
        assert kv.dtype == torch.float32
        assert torch.equal(scores.frame_attention[~mask], torch.zeros(int((~mask).sum())))
        torch.testing.assert_close(scores.final, direct.final, atol=2e-2, rtol=2e-2)
        finals[precision] = scores.final
    torch.testing.assert_close(finals["bfloat16"], finals["float32"], atol=2e-2, rtol=2e-2)
