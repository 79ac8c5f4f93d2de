"""The model registry: ``MODELS_DIR/NAME/VERSION/model.yaml`` cards and their weights.

Workflows name a model as ``NAME@VERSION``, ``NAME@latest`` or ``NAME`` (= latest). The
registry rescans the folder whenever a card appears, changes or disappears, so a version
dropped into ``models/`` is used by the next job without restarting anything; a job that has
already resolved its model keeps the card it resolved.

A card that does not validate, or whose weights are missing or do not match its ``sha256``,
is refused with the reason (:meth:`ModelRegistry.check` lists them for ``rtauto models``).
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from rtauto.errors import RtautoError
from rtauto_autocontour.card import KNOWN_BACKENDS, ModelCard

__all__ = ["ModelCheck", "ModelError", "ModelRegistry", "RegisteredModel", "sha256_of"]

CARD_FILE = "model.yaml"


class ModelError(RtautoError):
    """A model cannot be used: unknown name or version, invalid card, wrong weights."""


def sha256_of(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class RegisteredModel:
    """A card that validated, with where it lies and the hash of its exact text."""

    card: ModelCard
    folder: Path
    card_hash: str  # sha256 of model.yaml as read: what a job records

    @property
    def ref(self) -> str:
        return self.card.ref

    @property
    def weights_path(self) -> Path:
        return self.folder / self.card.weights

    def hashed_weights_file(self) -> Path:
        """The file ``sha256`` covers: the weights file, or a bundle's network file."""
        path = self.weights_path
        if path.is_dir():
            for candidate in ("models/model.ts", "models/model.pt"):
                if (path / candidate).is_file():
                    return path / candidate
            raise ModelError(f"{self.ref}: bundle {path} holds no models/model.ts or model.pt")
        return path

    def verify(self) -> None:
        """Raise :class:`ModelError` unless the weights exist and match the card's sha256."""
        path = self.weights_path
        if not path.exists():
            raise ModelError(f"{self.ref}: weights {path} do not exist")
        actual = sha256_of(self.hashed_weights_file())
        if actual != self.card.sha256:
            raise ModelError(
                f"{self.ref}: sha256 of {self.hashed_weights_file()} is {actual}, the card "
                f"says {self.card.sha256}; refusing to run weights the card does not describe"
            )


@dataclass(frozen=True)
class ModelCheck:
    """One card's status for ``rtauto models``: ``ok`` or the reason it is refused."""

    ref: str
    path: Path
    ok: bool
    reason: str = ""
    card_hash: str = ""


def _version_key(version: str) -> tuple:
    # Numeric parts compare as numbers, so 10 > 9 and 1.10 > 1.9.
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.split(r"[._-]", version)
    )


class ModelRegistry:
    """The cards under ``models_dir``; thread-safe, rescanned when a card file changes."""

    def __init__(self, models_dir: Path | str, backends: tuple[str, ...] | None = KNOWN_BACKENDS):
        """``backends``: the backend names a card may use (None: checked only when loading)."""
        self.models_dir = Path(models_dir)
        self.backends = tuple(backends) if backends is not None else None
        self._lock = threading.Lock()
        self._stamp: tuple = ()
        self._models: dict[tuple[str, str], RegisteredModel] = {}
        self._problems: dict[Path, str] = {}

    # -- scanning ----------------------------------------------------------------------------
    def _card_files(self) -> list[Path]:
        if not self.models_dir.is_dir():
            return []
        return sorted(self.models_dir.glob(f"*/*/{CARD_FILE}"))

    def _current_stamp(self) -> tuple:
        stamp = []
        for path in self._card_files():
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            stamp.append((str(path), stat.st_mtime_ns, stat.st_size))
        return tuple(stamp)

    def _read(self, path: Path) -> RegisteredModel:
        raw = path.read_bytes()
        try:
            data = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            what = getattr(exc, "problem", None) or str(exc)
            raise ModelError(f"{where}: not valid YAML: {what}") from exc
        if not isinstance(data, dict):
            raise ModelError(f"{path}: a model card is a mapping")
        try:
            card = ModelCard.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
            )
            raise ModelError(f"{path}: {problems}") from exc
        folder = path.parent
        if (card.name, card.version) != (folder.parent.name, folder.name):
            raise ModelError(
                f"{path}: card says {card.ref} but lies in {folder.parent.name}/{folder.name}"
            )
        if self.backends is not None and card.backend not in self.backends:
            raise ModelError(
                f"{path}: backend {card.backend!r} is not available (have {list(self.backends)})"
            )
        return RegisteredModel(card, folder, hashlib.sha256(raw).hexdigest())

    def rescan(self, *, force: bool = False) -> None:
        """Reread the cards if any card file appeared, changed or disappeared."""
        with self._lock:
            stamp = self._current_stamp()
            if stamp == self._stamp and not force:
                return
            models, problems = {}, {}
            for path in self._card_files():
                try:
                    model = self._read(path)
                except (ModelError, OSError) as exc:
                    problems[path] = str(exc)
                    continue
                models[(model.card.name, model.card.version)] = model
            self._models, self._problems, self._stamp = models, problems, stamp

    # -- lookup ------------------------------------------------------------------------------
    def models(self) -> list[RegisteredModel]:
        """Every valid card, by name then version."""
        self.rescan()
        return sorted(
            self._models.values(), key=lambda m: (m.card.name, _version_key(m.card.version))
        )

    def problems(self) -> dict[Path, str]:
        """Card files that were refused, with the reason."""
        self.rescan()
        return dict(self._problems)

    def resolve(self, ref: str, *, verify: bool = True) -> RegisteredModel:
        """The model ``NAME@VERSION`` / ``NAME@latest`` / ``NAME``, its weights verified."""
        self.rescan()
        name, _, version = ref.partition("@")
        version = version or "latest"
        versions = [m for (n, _), m in self._models.items() if n == name]
        if version == "latest":
            if not versions:
                raise ModelError(self._unknown(ref, name))
            model = max(versions, key=lambda m: _version_key(m.card.version))
            # a newer version whose card was refused is not passed over in silence: whoever
            # dropped it in meant it to be the latest
            newer = [
                (path, reason)
                for path, reason in self._problems.items()
                if path.parent.parent.name == name
                and _version_key(path.parent.name) > _version_key(model.card.version)
            ]
            if newer:
                path, reason = max(newer, key=lambda item: _version_key(item[0].parent.name))
                raise ModelError(
                    f"model {ref}: the newest version, {name}@{path.parent.name}, is refused "
                    f"({reason}); mend its card, or name the version to use ({model.ref})"
                )
        else:
            found = self._models.get((name, version))
            if found is None:
                raise ModelError(self._unknown(ref, name))
            model = found
        if verify:
            model.verify()
        return model

    def _unknown(self, ref: str, name: str) -> str:
        refused = [f"{p}: {r}" for p, r in self._problems.items() if p.parent.parent.name == name]
        known = sorted(m.ref for m in self._models.values())
        message = f"model {ref} is not in {self.models_dir} (known: {known or 'none'})"
        if not self.models_dir.is_dir():
            message += "; that folder does not exist (set models_dir, or --models)"
        if refused:
            message += "; refused cards: " + "; ".join(refused)
        return message

    def check(self) -> list[ModelCheck]:
        """Every card, valid or not, with its weights verified: what ``rtauto models`` shows."""
        self.rescan(force=True)
        checks = []
        for model in self.models():
            try:
                model.verify()
                checks.append(ModelCheck(model.ref, model.folder, True, "", model.card_hash))
            except ModelError as exc:
                checks.append(ModelCheck(model.ref, model.folder, False, str(exc), model.card_hash))
        for path, reason in sorted(self._problems.items()):
            ref = f"{path.parent.parent.name}@{path.parent.name}"
            checks.append(ModelCheck(ref, path.parent, False, reason))
        return sorted(checks, key=lambda c: c.ref)
