"""Inference backends: ONNX Runtime, TorchScript and MONAI bundles.

A backend loader is ``loader(card, path) -> predictor``; a predictor has ``provider`` (what
actually runs it, e.g. ``CUDAExecutionProvider``) and ``predict(batch)``, which maps a float32
array ``(n, 1, i, j, k)`` to logits ``(n, labels + 1, i, j, k)``. Only the network runs in
the backend: normalisation, sliding window and resampling stay outside (see ``inference``).

Loaded predictors are cached per process by the weights' sha256 and the card hash, so the
next job with the same model skips loading, and a new model version loads fresh.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rtauto_autocontour.card import ModelCard
from rtauto_autocontour.registry import ModelError, RegisteredModel

__all__ = [
    "BUILTIN_BACKENDS",
    "Predictor",
    "load_monai_bundle",
    "load_onnx",
    "load_predictor",
    "load_torchscript",
]

log = logging.getLogger(__name__)


class Predictor(Protocol):
    provider: str

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


class OnnxPredictor:
    """An ONNX Runtime session; CUDA when the CUDA provider is present, else CPU."""

    def __init__(self, path: Path, device: str = "auto"):
        import onnxruntime as ort

        available = ort.get_available_providers()
        wanted = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
            wanted.insert(0, "CUDAExecutionProvider")
        elif device == "cuda":
            raise ModelError(f"device cuda asked for, ONNX Runtime offers only {available}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=wanted)
        # The first provider of the session is the one that runs the graph's nodes.
        self.provider = self.session.get_providers()[0]
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, np.float32)})[0]


class TorchPredictor:
    """A TorchScript module (also what a MONAI bundle's ``model.ts`` is)."""

    def __init__(self, module: Any, device: str = "auto"):
        import torch

        use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
        if device == "cuda" and not use_cuda:
            raise ModelError("device cuda asked for, torch sees no CUDA device")
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.module = module.to(self.device).eval()
        self.provider = f"torch-{self.device.type}"

    def predict(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            tensor = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device)
            return self.module(tensor).float().cpu().numpy()


def load_onnx(card: ModelCard, path: Path, device: str = "auto") -> OnnxPredictor:
    """ONNX Runtime backend (``backend: onnx``)."""
    return OnnxPredictor(path, device)


def load_torchscript(card: ModelCard, path: Path, device: str = "auto") -> TorchPredictor:
    """TorchScript backend (``backend: torchscript``)."""
    import torch

    return TorchPredictor(torch.jit.load(str(path), map_location="cpu"), device)


def load_monai_bundle(card: ModelCard, path: Path, device: str = "auto") -> TorchPredictor:
    """A MONAI bundle folder (``backend: monai_bundle``): ``configs/metadata.json`` and
    ``models/model.ts`` (TorchScript) or ``models/model.pt`` (state dict for the
    ``network_def`` of ``configs/inference.json``)."""
    import torch

    metadata_file = path / "configs" / "metadata.json"
    if not metadata_file.is_file():
        raise ModelError(f"{path} is not a MONAI bundle: configs/metadata.json is missing")
    metadata = json.loads(metadata_file.read_text(encoding="utf-8"))
    log.info("MONAI bundle %s version %s", metadata.get("name", path.name), metadata.get("version"))
    if (path / "models" / "model.ts").is_file():
        module = torch.jit.load(str(path / "models" / "model.ts"), map_location="cpu")
        return TorchPredictor(module, device)
    if (path / "models" / "model.pt").is_file():
        from monai.bundle import ConfigParser

        config_file = next(
            (
                path / "configs" / f"inference.{ext}"
                for ext in ("json", "yaml")
                if (path / "configs" / f"inference.{ext}").is_file()
            ),
            None,
        )
        if config_file is None:
            raise ModelError(f"{path}: models/model.pt needs configs/inference.json network_def")
        parser = ConfigParser()
        parser.read_config(str(config_file))
        network = parser.get_parsed_content("network_def")
        state = torch.load(str(path / "models" / "model.pt"), map_location="cpu", weights_only=True)
        network.load_state_dict(state)
        return TorchPredictor(network, device)
    raise ModelError(f"{path}: the bundle holds no models/model.ts or models/model.pt")


BUILTIN_BACKENDS: dict[str, Callable[..., Predictor]] = {
    "onnx": load_onnx,
    "torchscript": load_torchscript,
    "monai_bundle": load_monai_bundle,
}

_cache: dict[tuple[str, str, str], Predictor] = {}
_cache_lock = threading.Lock()


def load_predictor(
    model: RegisteredModel,
    backends: dict[str, Callable[..., Predictor]] | None = None,
    device: str = "auto",
) -> Predictor:
    """The predictor of ``model`` (weights verified), cached per process.

    ``backends`` maps backend names to loaders (the built-ins by default; the plugin host's
    ``model_backends`` to include other plugins'). Logs the provider that runs the model.
    """
    table = backends or BUILTIN_BACKENDS
    loader = table.get(model.card.backend)
    if loader is None:
        raise ModelError(f"{model.ref}: no backend {model.card.backend!r} (have {sorted(table)})")
    key = (model.card_hash, model.card.sha256, device)
    with _cache_lock:
        predictor = _cache.get(key)
        if predictor is None:
            model.verify()
            try:
                # the hook's loader signature is (card, path); the built-ins also take a device
                predictor = (
                    loader(model.card, model.weights_path, device)
                    if loader in BUILTIN_BACKENDS.values()
                    else loader(model.card, model.weights_path)
                )
            except ModelError:
                raise
            except Exception as exc:
                raise ModelError(
                    f"{model.ref}: the {model.card.backend} backend failed to load "
                    f"{model.weights_path}: {exc}"
                ) from exc
            _cache[key] = predictor
    log.info("model %s runs on %s (%s)", model.ref, predictor.provider, model.card.backend)
    return predictor
