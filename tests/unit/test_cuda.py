"""The GPU path (issue 12, part 4): bf16 autocast for ``precision="auto"/"bfloat16"`` on CUDA,
``--dtype float32`` honoured (true fp32 matmuls, no TF32), every parameter and buffer on the
device after ``.to(device)``, the exact short-text encoder and the K/V-free fusion on CUDA, and
the sidecar serving a real gRPC call from a CUDA model.

Marked ``cuda``; every test skips cleanly on a machine without CUDA (run them with
``pytest -m cuda``; ``benchmarks/gpu_check.sh`` does, on a lent GPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tb_reranker.model import TokenBinder, TokenBinderConfig, save_checkpoint

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TEXTS = ["a red cube then a blue ball", "a cat", " ".join(["word"] * 40)]


def _model(device: str = "cpu", **overrides) -> TokenBinder:
    model = TokenBinder(TokenBinderConfig.tiny(fusion_blocks=2, **overrides), device=device)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a head that really scores (the last layer starts at zero)
        last = model.fusion.head[-1]
        last.weight.copy_(torch.randn(last.weight.shape, generator=generator).to(device))
        last.bias.copy_(torch.randn(last.bias.shape, generator=generator).to(device))
    return model.eval()


def _candidates(model: TokenBinder, batch: int = 3, k: int = 5, seed: int = 0):
    """cand_cls [B, K, D], cand_tokens [B, K, T, D] (CPU, float32)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, k, model.num_frames, model.embed_dim, generator=generator)
    tokens = torch.nn.functional.normalize(tokens, dim=-1)
    return torch.nn.functional.normalize(tokens.mean(2), dim=-1), tokens


class _Dtypes:
    """Output dtypes of the fusion's query projection and the text tower's first MLP."""

    def __init__(self, model: TokenBinder) -> None:
        self.fusion: list[torch.dtype] = []
        self.text: list[torch.dtype] = []
        self._handles = [
            model.fusion.blocks[0].q_proj.register_forward_hook(
                lambda _m, _i, out: self.fusion.append(out.dtype)
            ),
            model.clip.transformer.resblocks[0].mlp.register_forward_hook(
                lambda _m, _i, out: self.text.append(out.dtype)
            ),
        ]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _scores(model: TokenBinder, cached: bool = False):
    """Indicators [B, m, D] and final scores [B, K] of TEXTS against fixed candidates."""
    cand_cls, cand_tokens = _candidates(model)
    with torch.inference_mode():
        indicators = model.encode_text(TEXTS)
        if cached:
            kv = model.project_candidates(cand_tokens.reshape(-1, *cand_tokens.shape[2:]))
            kv = kv.view(*cand_tokens.shape[:2], *kv.shape[1:])
            scores = model.focused_scores(indicators, cand_cls, cand_kv=kv)
        else:
            scores = model.focused_scores(indicators, cand_cls, cand_tokens)
    return indicators, scores


@pytest.mark.parametrize("precision", ["auto", "bfloat16"])
def test_bf16_autocast_on_cuda(precision: str) -> None:
    model = _model("cuda")
    model.precision = precision
    dtypes = _Dtypes(model)
    try:
        indicators, scores = _scores(model)
    finally:
        dtypes.close()
    assert set(dtypes.fusion) == set(dtypes.text) == {torch.bfloat16}
    assert indicators.dtype == scores.final.dtype == torch.float32  # outputs stay float32
    assert indicators.device.type == scores.final.device.type == "cuda"
    reference_model = _model("cpu")
    reference_indicators, reference = _scores(reference_model)
    assert not torch.equal(scores.final.cpu(), reference.final)  # really bf16...
    torch.testing.assert_close(scores.final.cpu(), reference.final, atol=6e-2, rtol=6e-2)
    torch.testing.assert_close(indicators.cpu(), reference_indicators, atol=3e-2, rtol=3e-2)


def test_float32_is_honoured_on_cuda() -> None:
    """precision="float32": no autocast, and fp32 matmuls (TF32 would miss the CPU result by
    about 1e-3)."""
    model = _model("cuda")
    model.precision = "float32"
    dtypes = _Dtypes(model)
    try:
        indicators, scores = _scores(model)
    finally:
        dtypes.close()
    assert set(dtypes.fusion) == set(dtypes.text) == {torch.float32}
    reference_indicators, reference = _scores(_model("cpu"))
    torch.testing.assert_close(indicators.cpu(), reference_indicators, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scores.final.cpu(), reference.final, atol=1e-5, rtol=1e-4)


def test_serve_dtype_float32_on_cuda_reaches_the_model(tmp_path: Path) -> None:
    """``tb serve --device cuda --dtype float32``: the loaded model runs float32 on CUDA."""
    from tb_reranker.cli import build_parser
    from tb_reranker.config import Settings
    from tb_reranker.server.app import load_components
    from tb_reranker.server.config import ServerConfig

    checkpoint, store, ids = _checkpoint_and_store(tmp_path)
    for flags, expected in (
        (["--device", "cuda", "--dtype", "float32"], torch.float32),
        (["--device", "cuda"], torch.bfloat16),  # auto on CUDA
    ):
        args = build_parser().parse_args(["serve", *flags])
        config = ServerConfig.from_env(dtype=args.dtype, device=args.device)
        settings = Settings.from_env(checkpoint=str(checkpoint), store=str(store))
        components = load_components(settings, config)
        try:
            model = components.reranker.model
            assert components.device.startswith("cuda") and model.device.type == "cuda"
            dtypes = _Dtypes(model)
            try:
                indicators = components.reranker.encode(["a red cube"])
                result = components.reranker.rerank(indicators, [ids[:4]])[0]
            finally:
                dtypes.close()
            assert set(dtypes.fusion) == set(dtypes.text) == {expected}
            assert len(result.candidates) == 4
            assert all(np.isfinite(c.score) for c in result.candidates)
        finally:
            components.reranker.store.close()


def _assert_all_on(model: TokenBinder, device_type: str) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert tensor.device.type == device_type, name
    # modules that keep tensors outside parameters/buffers
    assert model.text.attn_mask.device.type == device_type
    assert model.text.positional_embedding.device.type == device_type
    assert model.device.type == device_type


def test_every_module_and_buffer_follows_to_device() -> None:
    model = _model("cpu")
    before_indicators, before = _scores(model)  # fills the fusion's transposed-weight cache on CPU
    model.to("cuda")
    _assert_all_on(model, "cuda")
    _, scores = _scores(model)  # "auto": bf16 autocast on CUDA
    assert scores.final.device.type == "cuda"
    model.precision = "float32"
    indicators, scores = _scores(model)
    torch.testing.assert_close(scores.final.cpu(), before.final, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(indicators.cpu(), before_indicators, atol=1e-5, rtol=1e-4)
    model.to("cpu")
    _assert_all_on(model, "cpu")
    _, back = _scores(model)
    torch.testing.assert_close(back.final, before.final, atol=1e-5, rtol=1e-4)
    built = _model("cuda")  # built on the device directly
    _assert_all_on(built, "cuda")


def test_exact_paths_hold_on_cuda() -> None:
    """float32 on CUDA: the truncated text pass equals the full one, the K/V-free fusion equals
    the projected K/V."""
    model = _model("cuda")
    model.precision = "float32"
    tokens = model.tokenize(TEXTS).cuda()
    with torch.inference_mode():
        truncated = model.text(tokens)
        full = model.text(tokens, truncate=False)
    for got, expected in zip(truncated, full, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    _, kv_free = _scores(model)
    _, projected = _scores(model, cached=True)
    torch.testing.assert_close(kv_free.final, projected.final, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        kv_free.frame_attention, projected.frame_attention, atol=1e-6, rtol=1e-5
    )


def _checkpoint_and_store(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    from tb_reranker.server.testing import build_tiny_components

    components, ids = build_tiny_components(tmp_path, num_videos=8)
    save_checkpoint(components.reranker.model, tmp_path / "checkpoint")
    components.reranker.store.close()
    return tmp_path / "checkpoint", tmp_path / "frames", ids


def test_sidecar_serves_on_cuda(tmp_path: Path) -> None:
    """A real gRPC Encode and Rerank on the sidecar whose model is on CUDA (float32): the same
    answers as the CPU model in-process."""
    import grpc

    from tb_reranker._pb.tb_reranker.v1 import reranker_pb2 as pb
    from tb_reranker._pb.tb_reranker.v1 import reranker_pb2_grpc as pb_grpc
    from tb_reranker.config import Settings
    from tb_reranker.server.app import load_components
    from tb_reranker.server.config import ServerConfig
    from tb_reranker.server.testing import ServerThread
    from tb_reranker.wire.convert import tensor_from_proto

    checkpoint, store, ids = _checkpoint_and_store(tmp_path)
    settings = Settings.from_env(checkpoint=str(checkpoint), store=str(store))
    cpu = load_components(settings, ServerConfig(device="cpu", dtype="float32"))
    try:
        expected_indicators = cpu.reranker.encode(["a dog runs"])
        expected = cpu.reranker.rerank(expected_indicators, [ids[:6]])[0]
    finally:
        cpu.reranker.store.close()
    config = ServerConfig(port=0, device="cuda", dtype="float32")
    components = load_components(settings, config)
    assert components.reranker.model.device.type == "cuda"
    try:
        with (
            ServerThread(config, lambda: components) as server,
            grpc.insecure_channel(server.target) as channel,
        ):
            encoded = pb_grpc.EncodeServiceStub(channel).Encode(
                pb.EncodeRequest(texts=["a dog runs"]), timeout=60
            )
            indicators = tensor_from_proto(encoded.indicators)
            np.testing.assert_allclose(indicators, expected_indicators, atol=1e-4)
            reply = pb_grpc.RerankServiceStub(channel).Rerank(
                pb.RerankRequest(text="a dog runs", candidates_ids=ids[:6]), timeout=60
            )
            about = pb_grpc.InfoServiceStub(channel).Info(pb.InfoRequest(), timeout=60)
    finally:
        components.reranker.store.close()
    assert about.device.startswith("cuda")
    assert sum(rank.reranked for rank in reply.ranks) == 6
    served = [(rank.id, rank.score) for rank in reply.ranks]
    assert [video_id for video_id, _ in served] == [c.id for c in expected.candidates]
    np.testing.assert_allclose(
        [score for _, score in served], [c.score for c in expected.candidates], atol=1e-4
    )


def test_every_augmentation_runs_on_cuda_frames() -> None:
    """Training moves frames to the device before augmenting them; every augmentation keeps them
    there (the texture's noise and the time warp's index are drawn on the CPU generator)."""
    from tb_reranker.training.augment import Augment

    spec = "crop=1,colour=1,shift=1,zoom=1,noise=1,time=1,flip=1,reverse=1"
    frames = torch.randn(2, 6, 3, 16, 16, device="cuda")
    masks = torch.ones(2, 6, dtype=torch.bool, device="cuda")
    texts = ["a red square then a blue circle", "a cross moving left"]
    out, out_masks, out_texts = Augment.parse(spec)(
        frames, masks, texts, torch.Generator().manual_seed(0)
    )
    assert out.is_cuda and out_masks.is_cuda and len(out_texts) == 6
