"""The daemon configuration (``rtauto.yaml``): a pydantic model, loaded with line-numbered errors.

Every path in the file is resolved against the file's folder; everything rtauto keeps (spool,
quarantine, job folders, the SQLite store) lives under ``home``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from rtauto.errors import ConfigError

__all__ = [
    "CompletionDefaults",
    "DeadLetterSettings",
    "Destination",
    "ExecutorSettings",
    "RetentionSettings",
    "ScpSettings",
    "Settings",
    "WatchFolder",
    "WebSettings",
    "effective_destinations",
    "load_settings",
]

AE_TITLE_PATTERN = r"^[\x20-\x5b\x5d-\x7e]{1,16}$"  # DICOM AE: 16 chars, no backslash


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScpTls(_Strict):
    """DICOM TLS (PS3.15 Annex B) on the storage SCP's port: TLS 1.2 or later."""

    cert_file: Path = Field(description="rtauto's certificate (PEM, chain included)")
    key_file: Path = Field(description="the private key of cert_file (PEM)")
    client_ca_file: Path | None = Field(
        None,
        description="CA bundle verifying client certificates; when set, every client must "
        "present one it signed (mutual TLS)",
    )


class ScpSettings(_Strict):
    """The storage SCP (C-STORE and C-ECHO)."""

    enabled: bool = True
    ae_title: str = Field("RTAUTO", pattern=AE_TITLE_PATTERN)
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535, description="0 lets the OS choose (tests)")
    allowed_calling_ae_titles: list[str] = Field(
        default_factory=list, description="empty: any calling AE title is accepted"
    )
    processes: int = Field(
        2, ge=1, le=64, description="receiving processes sharing the port (SO_REUSEPORT)"
    )
    max_pdu: int = Field(0, ge=0, description="maximum PDU size we receive; 0 = unlimited")
    network_timeout: float = Field(60.0, gt=0)
    implementation: Literal["native", "pynetdicom"] = Field(
        "native",
        description="the DICOM network layer receiving C-STORE: rtauto's own or pynetdicom",
    )
    tls: ScpTls | None = Field(None, description="accept associations over TLS only")


class WatchFolder(_Strict):
    """A drop folder: files are ingested once they have not changed for ``settle_seconds``."""

    path: Path
    settle_seconds: float = Field(2.0, ge=0)
    recursive: bool = True
    delete_after_ingest: bool = Field(
        False, description="remove the dropped file once it is safely in the spool"
    )


class CompletionDefaults(_Strict):
    """Defaults for workflows that do not set their own completion policy."""

    series_quiet_seconds: float = Field(10.0, ge=0)
    study_quiet_seconds: float = Field(30.0, ge=0)
    max_wait_seconds: float = Field(3600.0, gt=0)


class ExecutorSettings(_Strict):
    kind: Literal["local"] = "local"
    workers: int = Field(2, ge=1, le=64, description="worker processes running steps")
    poll_seconds: float = Field(0.2, gt=0)


class RetentionSettings(_Strict):
    """How long rtauto keeps what it no longer needs; a period left out keeps that kind of
    data for ever. The daemon removes what has passed its period every ``interval_minutes``
    (``rtauto purge`` does it by hand, ``--dry-run`` shows what would go)."""

    received_days: float | None = Field(
        None,
        gt=0,
        description="received instances (spool files and their index rows) are removed once "
        "nothing of their patient (of their study, without a Patient ID) has arrived for this "
        "many days, no job of that patient is unfinished and every series was complete",
    )
    jobs_days: float | None = Field(
        None,
        gt=0,
        description="a job that ended this many days ago loses its folder under HOME/jobs "
        "(artifacts), and its record (with its steps, artifact and delivery rows) once its "
        "study holds no received instance; a job with a result not delivered (pending, "
        "failed or dead-lettered) is kept",
    )
    quarantine_days: float | None = Field(
        None, gt=0, description="quarantined files and their reason files, by age"
    )
    audit_days: float | None = Field(None, gt=0, description="audit events, by age")
    interval_minutes: float = Field(
        60.0, gt=0, description="how often the daemon removes what has passed its period"
    )

    @property
    def enabled(self) -> bool:
        return any(
            days is not None
            for days in (
                self.received_days,
                self.jobs_days,
                self.quarantine_days,
                self.audit_days,
            )
        )


class DeadLetterSettings(_Strict):
    """The daemon's background retry of dead letters (items a routing step gave up on).

    Every ``retry_every_minutes`` the daemon sends the dead letters of each failed job again,
    each to the destination that gave up on it, when every failed step of the job failed
    only for want of delivery (a step that failed on bad data is never retried) and the job
    ended within ``retry_for_hours``. Once all of a job's dead letters arrived, the job is
    resumed: its failed steps and the steps skipped because of them run again. A job whose
    destination is still down stays FAIL meanwhile. Each job's dead letters are sent in a
    worker process, killed past ``send_timeout_minutes`` (a destination that hangs)."""

    retry_every_minutes: float = Field(
        15.0, gt=0, description="how often the daemon sends the dead letters again"
    )
    retry_for_hours: float = Field(
        72.0,
        ge=0,
        description="a job's dead letters are retried while it ended at most this many hours "
        "ago (a destination down over a long weekend); 0 turns the background retry off",
    )

    send_timeout_minutes: float = Field(
        10.0,
        gt=0,
        description="the longest one job's dead letters may take to send again; past it the "
        "worker sending them is killed and they wait for the next pass",
    )

    @property
    def enabled(self) -> bool:
        return self.retry_for_hours > 0


class WebSettings(_Strict):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class Destination(BaseModel):
    """A named destination. ``type`` selects the destination type (``dicom`` by default when
    ``ae_title`` is given, ``folder`` when ``path`` is given); other keys are that type's."""

    model_config = ConfigDict(extra="allow")

    type: str | None = None

    def resolved_type(self) -> str:
        if self.type:
            return self.type
        extra = self.model_extra or {}
        if "path" in extra:
            return "folder"
        return "dicom"

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Settings(_Strict):
    """rtauto's daemon configuration."""

    home: Path = Field(Path("rtauto-home"), description="all state: spool, jobs, store")
    store_url: str | None = Field(
        None, description="SQLAlchemy URL; default SQLite (WAL) at HOME/rtauto.db"
    )
    workflows_dir: Path = Path("workflows")
    models_dir: Path = Path("models")
    uid_root: str | None = Field(
        None, description="organisation UID root for new UIDs (default: pydicom's)"
    )
    min_free_mb: float = Field(
        1024,
        ge=0,
        description="free space (MB) kept on the file system of home: below it the SCP answers "
        "C-STOREs with 0xA700 (out of resources; the sender keeps the instance and sends it "
        "again) and drop-folder files wait where they are, so running jobs, the job store and "
        "the quarantine keep room; 0 turns the reserve off",
    )
    scp: ScpSettings = Field(default_factory=ScpSettings)
    watch: list[WatchFolder] = Field(default_factory=list)
    completion: CompletionDefaults = Field(default_factory=CompletionDefaults)
    executor: ExecutorSettings = Field(default_factory=ExecutorSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    dead_letters: DeadLetterSettings = Field(default_factory=DeadLetterSettings)
    destinations: dict[str, Destination] = Field(default_factory=dict)
    plugins: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-plugin configuration blocks, by plugin name"
    )
    disabled_plugins: list[str] = Field(default_factory=list)
    plugin_modules: dict[str, str] = Field(
        default_factory=dict,
        description="site plugins that are not packaged: name -> importable module "
        "(e.g. {local_checks: my_site.checks}); loaded like entry-point plugins",
    )
    log_level: Annotated[
        Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        BeforeValidator(lambda v: v.upper() if isinstance(v, str) else v),
    ] = "INFO"

    @field_validator("uid_root")
    @classmethod
    def _check_uid_root(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from rtauto.uids import is_valid_uid

        root = value.rstrip(".")
        if not is_valid_uid(root) or len(root) > 40:
            raise ValueError(f"uid_root {value!r} is not a valid UID root of at most 40 characters")
        return root + "."

    # -- derived locations -------------------------------------------------------------------
    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    @property
    def quarantine_dir(self) -> Path:
        return self.home / "quarantine"

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    @property
    def incoming_dir(self) -> Path:
        """Temporary files of the spool (same file system, so rename is atomic)."""
        return self.home / "spool" / ".incoming"

    @property
    def database_path(self) -> Path:
        """The embedded SQLite job store's file (used unless ``store_url`` is set)."""
        return self.home / "rtauto.db"

    @property
    def database_url(self) -> str:
        return self.store_url or f"sqlite:///{self.database_path.resolve()}"

    def resolve_paths(self, base: Path) -> Settings:
        """Paths relative to ``base`` (the config file's folder) made absolute."""

        def absolute(p: Path) -> Path:
            p = p.expanduser()
            return p if p.is_absolute() else (base / p).resolve()

        data = self.model_copy(deep=True)
        data.home = absolute(self.home)
        data.workflows_dir = absolute(self.workflows_dir)
        data.models_dir = absolute(self.models_dir)
        for folder in data.watch:
            folder.path = absolute(folder.path)
        return data

    def ensure_dirs(self) -> None:
        for d in (self.home, self.spool_dir, self.incoming_dir, self.quarantine_dir, self.jobs_dir):
            d.mkdir(parents=True, exist_ok=True)


def effective_destinations(
    settings: Settings, workflow_destinations: dict[str, Destination] | None
) -> dict[str, Destination]:
    """The destinations a job's steps see: the workflow's ``destinations:`` are defaults, the
    daemon configuration's destinations of the same name win (the site maps a workflow's
    names onto its own nodes, so a shared workflow needs no edit)."""
    merged = dict(workflow_destinations or {})
    merged.update(settings.destinations)
    return merged


def _line_of(node: yaml.Node | None, path: tuple[Any, ...]) -> tuple[int, int] | None:
    """Line and column (1-based) of the value at ``path`` in a composed YAML document."""
    best = None
    for key in path:
        if node is None:
            break
        best = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if k.value == str(key):
                    best = (k.start_mark.line + 1, k.start_mark.column + 1)
                    nxt = v
                    break
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            node = None
    if node is not None:
        best = (node.start_mark.line + 1, node.start_mark.column + 1)
    return best


def load_settings(path: Path | None, **overrides: Any) -> Settings:
    """Load the daemon configuration; ``overrides`` (non-None) replace top-level values.

    Raises :class:`ConfigError` with ``file:line:column: message`` lines.
    """
    data: dict[str, Any] = {}
    base = Path.cwd()
    node = None
    if path is not None:
        path = Path(path)
        base = path.parent.resolve()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the configuration: {exc}") from exc
        try:
            node = yaml.compose(text)
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            raise ConfigError(f"{where}: {getattr(exc, 'problem', exc)}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}:1:1: the configuration must be a mapping")
    env_home = os.environ.get("RTAUTO_HOME")
    if env_home and "home" not in overrides:
        data["home"] = env_home
    for key, value in overrides.items():
        if value is None:
            continue
        if "." in key:
            section, field = key.split(".", 1)
            data.setdefault(section, {})[field] = value
        else:
            data[key] = value
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            pos = _line_of(node, loc) if node is not None else None
            where = f"{path}:{pos[0]}:{pos[1]}" if (path and pos) else str(path or "<flags>")
            dotted = ".".join(str(p) for p in loc)
            lines.append(f"{where}: {dotted}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from exc
    return settings.resolve_paths(base)
