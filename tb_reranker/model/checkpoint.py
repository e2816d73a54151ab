"""TokenBinder checkpoints: ``config.json`` + ``model.safetensors``, never pickle.

``config.json`` holds the format tag, the :class:`TokenBinderConfig`, the sha256 of the weights
file (tamper/corruption detection), the model fingerprint and (since the identity was split) the
vision and query-side fingerprints. Files are written to temporary
names and renamed into place, so a crash mid-save never leaves a half-written checkpoint that
passes the hash check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from tb_reranker.errors import CheckpointError, InvalidInputError, NotFoundError
from tb_reranker.model.config import TokenBinderConfig
from tb_reranker.model.inference import WITHOUT_VISION
from tb_reranker.model.precision import resolve_device
from tb_reranker.model.tokenbinder import TokenBinder

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "FORMAT", "save_checkpoint", "load_checkpoint"]

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "tb_reranker.tokenbinder/1"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(model: TokenBinder, directory: str | Path) -> Path:
    """Save ``model`` into ``directory`` (created if needed); returns the directory."""
    from safetensors.torch import save_file

    if not model.has_vision:
        raise CheckpointError(f"cannot save to {directory}: {WITHOUT_VISION}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: tensor.detach().to("cpu").contiguous().clone()
        for name, tensor in model.state_dict().items()
    }
    fingerprint, vision_fingerprint, query_fingerprint = model._identities()  # one pass
    weights_tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(weights_tmp), metadata={"format": FORMAT, "fingerprint": fingerprint})
    document: dict[str, Any] = {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": _sha256_file(weights_tmp),
        "fingerprint": fingerprint,
        "vision_fingerprint": vision_fingerprint,
        "query_fingerprint": query_fingerprint,
    }
    config_tmp = directory / (CONFIG_FILE + ".tmp")
    config_tmp.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    os.replace(weights_tmp, directory / WEIGHTS_FILE)
    os.replace(config_tmp, directory / CONFIG_FILE)
    logger.info("saved TokenBinder %s to %s", fingerprint, directory)
    return directory


def _read_document(directory: Path) -> dict[str, Any]:
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {CONFIG_FILE}")
    try:
        document = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {config_path} is not readable JSON: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise CheckpointError(
            f"{config_path} is not a TokenBinder checkpoint (format {found!r}, expected {FORMAT!r})"
        )
    for key in ("config", "weights_sha256", "fingerprint"):
        if key not in document:
            raise CheckpointError(f"{config_path} lacks the {key!r} entry")
    return document


def _check_shapes(directory: Path, weights_path: Path, config: Any) -> None:
    """Compare the config's parameter shapes with the weights file's header before any memory is
    allocated: an edited config (``embed_dim: 1048576``) must not build a 14 GB model first.

    The file's tensor shapes come from the safetensors header alone (``safe_open``); the
    config's from the model built on the ``meta`` device (shapes without storage).
    """
    from safetensors import SafetensorError, safe_open

    from tb_reranker.model.tokenbinder import TokenBinder

    try:
        with safe_open(str(weights_path), framework="pt") as handle:  # reads the header only
            found = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {weights_path} is not a valid safetensors file: {exc}"
        ) from exc
    try:
        with torch.device("meta"):
            skeleton = TokenBinder(config, device="meta", load_pretrained=False)
        expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    except Exception as exc:  # noqa: BLE001 - any config the model cannot be built from
        raise CheckpointError(
            f"checkpoint {directory}: config cannot build a model: {exc}"
        ) from exc
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(
        f"{name} {found[name]} in the weights vs {expected[name]} from the config"
        for name in set(expected) & set(found)
        if found[name] != expected[name]
    )
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"missing {missing[:5]}{' …' if len(missing) > 5 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
        if mismatched:
            details.append(f"shape mismatch {mismatched[:5]}{' …' if len(mismatched) > 5 else ''}")
        raise CheckpointError(
            f"checkpoint {directory}: weights do not match the config: " + "; ".join(details)
        )


def load_checkpoint(
    directory: str | Path,
    device: str | torch.device | None = None,
    *,
    inference: bool = False,
    vision: bool = True,
) -> TokenBinder:
    """Rebuild the model saved in ``directory`` without the network.

    ``inference=True`` (search and serving) returns it prepared for inference
    (``TokenBinder.prepare_for_inference``: frozen, packed linear layers on CPU, fingerprints
    computed once); the default returns a plain model (training, evaluation, tools).
    ``vision=False`` with ``inference=True`` (the sidecar) frees the vision tower once the
    fingerprints are verified: the model reranks and encodes texts, never videos.

    Raises NotFoundError (no such directory) or CheckpointError (missing file, malformed config,
    weights hash mismatch, weights that do not fit the config, fingerprint mismatch).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.is_dir():
        raise NotFoundError(f"checkpoint directory {directory} does not exist")
    document = _read_document(directory)
    try:
        config = TokenBinderConfig.from_dict(document["config"])
    except InvalidInputError as exc:
        raise CheckpointError(f"checkpoint {directory}: {exc}") from exc
    weights_path = directory / str(document.get("weights_file", WEIGHTS_FILE))
    if not weights_path.is_file():
        raise CheckpointError(f"checkpoint {directory} has no weights file {weights_path.name}")
    actual_sha = _sha256_file(weights_path)
    if actual_sha != document["weights_sha256"]:
        raise CheckpointError(
            f"checkpoint {directory}: {weights_path.name} has sha256 {actual_sha[:16]}… but "
            f"{CONFIG_FILE} records {str(document['weights_sha256'])[:16]}…: the weights were "
            "modified or corrupted after saving"
        )
    _check_shapes(directory, weights_path, config)
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {weights_path} is not a valid safetensors file: {exc}"
        ) from exc
    model = TokenBinder(config, device="cpu", load_pretrained=False)
    model.load_state_dict(tensors, strict=True)
    del tensors
    model.to(resolve_device(device))
    model.eval()
    if inference:
        model.prepare_for_inference()
    _verify_identity(directory, document, model)
    if inference and not vision:
        model.prepare_for_inference(vision=False)
    logger.info("loaded TokenBinder %s from %s", document["fingerprint"], directory)
    return model


def _verify_identity(directory: Path, document: dict[str, Any], model: TokenBinder) -> None:
    """The loaded model's fingerprints (one pass over the weights) against those recorded."""
    fingerprint, vision, query = model._identities()
    if fingerprint != document["fingerprint"]:
        raise CheckpointError(
            f"checkpoint {directory}: fingerprint {fingerprint} differs from the recorded "
            f"{document['fingerprint']}: config and weights do not belong together"
        )
    for key, value in (("vision_fingerprint", vision), ("query_fingerprint", query)):
        # written since the identity was split; older checkpoints lack them
        if key in document and document[key] != value:
            raise CheckpointError(
                f"checkpoint {directory}: {key} {value} differs from the recorded "
                f"{document[key]}: it was written by another version of tb_reranker "
                "(the preprocessing the vision side names changed)"
            )
