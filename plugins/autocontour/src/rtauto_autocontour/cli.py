"""``rtauto models``: list the model cards under the models folder and check each one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def models_command(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", envvar="RTAUTO_CONFIG", help="daemon configuration"),
    ] = None,
    home: Annotated[Path | None, typer.Option("--home", envvar="RTAUTO_HOME")] = None,
    models_dir: Annotated[
        Path | None, typer.Option("--models", help="models folder (default: the configuration's)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """List model cards (NAME@VERSION) and check them: card schema, labels, backend, sha256 of
    the weights. Exits 1 when a card is refused."""
    from rtauto.config import load_settings
    from rtauto.errors import ConfigError
    from rtauto.hooks import build_plugin_manager
    from rtauto_autocontour.registry import ModelRegistry

    try:
        settings = load_settings(config, home=str(home) if home else None)
    except ConfigError as exc:
        typer.echo(f"rtauto: invalid configuration:\n{exc}", err=True)
        raise typer.Exit(2) from exc
    folder = models_dir or settings.models_dir
    backends = tuple(build_plugin_manager(settings).model_backends)
    checks = ModelRegistry(folder, backends=backends).check()
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {
                        "model": c.ref,
                        "path": str(c.path),
                        "ok": c.ok,
                        "reason": c.reason,
                        "card_sha256": c.card_hash,
                    }
                    for c in checks
                ],
                indent=2,
            )
        )
    else:
        if not checks:
            missing = "" if Path(folder).is_dir() else " (no such folder)"
            typer.echo(f"no model cards under {folder}{missing}", err=bool(missing))
        for c in checks:
            state = "ok" if c.ok else f"REFUSED: {c.reason}"
            typer.echo(f"{c.ref:<28} {c.card_hash[:12]:<12}  {state}")
    raise typer.Exit(0 if Path(folder).is_dir() and all(c.ok for c in checks) else 1)
