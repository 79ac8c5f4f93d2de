"""Writing the report: JSON (stable schema) and a self-contained HTML page (inline SVG DVH)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["render_html", "write_json", "to_jsonable"]

_STATUS_COLOURS = {
    "pass": "#1b7f3b",
    "warn": "#b26a00",
    "fail": "#b00020",
    "error": "#b00020",
    "not_applicable": "#666666",
}


def to_jsonable(value: Any) -> Any:
    """``value`` with numpy scalars/arrays, tuples and non-finite floats made JSON-safe."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [to_jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(report: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(to_jsonable(report), indent=2, sort_keys=False), encoding="utf-8")
    return path


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return value
    return json.dumps(to_jsonable(value), separators=(", ", ": "))


def _svg_dvh(rows: list[dict[str, Any]], width: int = 720, height: int = 360) -> str:
    if not rows:
        return "<p>No DVH (no dose in the input).</p>"
    left, right, top, bottom = 55, 170, 15, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    max_dose = max((r["curve"]["dose_gy"][-1] for r in rows if r["curve"]["dose_gy"]), default=1)
    max_dose = max(max_dose, 1e-6)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="cumulative DVH">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
        'stroke="#999"/>',
    ]
    for i in range(6):
        y = top + plot_h * i / 5
        x = left + plot_w * i / 5
        parts.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">'
            f"{100 - 20 * i}</text>"
        )
        parts.append(
            f'<text x="{x:.1f}" y="{top + plot_h + 16}" font-size="11" text-anchor="middle">'
            f"{max_dose * i / 5:.3g}</text>"
        )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{height - 6}" font-size="12" '
        'text-anchor="middle">dose (Gy)</text>'
    )
    parts.append(
        f'<text x="14" y="{top + plot_h / 2}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2})">volume (%)</text>'
    )
    for n, row in enumerate(rows):
        r, g, b = (row.get("color") or [0, 0, 0])[:3]
        colour = f"rgb({r},{g},{b})"
        points = " ".join(
            f"{left + plot_w * d / max_dose:.1f},{top + plot_h * (1 - v / 100):.1f}"
            for d, v in zip(row["curve"]["dose_gy"], row["curve"]["volume_percent"], strict=True)
        )
        name = html.escape(row["structure"])
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}">'
            f"<title>{name}</title></polyline>"
        )
        ly = top + 12 + 14 * n
        parts.append(
            f'<line x1="{width - right + 10}" y1="{ly - 4}" x2="{width - right + 30}" '
            f'y2="{ly - 4}" stroke="{colour}" stroke-width="3"/>'
            f'<text x="{width - right + 35}" y="{ly}" font-size="11">{name}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: dict[str, Any]) -> str:
    """The report as one HTML page: no script, no external resource."""
    plan = report["plan"]
    esc = html.escape
    rows = []
    for check in report["checks"]:
        colour = _STATUS_COLOURS.get(check["status"], "#000")
        rows.append(
            "<tr>"
            f"<td><code>{esc(check['id'])}</code><br><small>{esc(check['title'])}</small></td>"
            f'<td style="color:{colour};font-weight:bold">{esc(check["status"])}</td>'
            f"<td>{esc(_fmt(check.get('measured')))}</td>"
            f"<td>{esc(_fmt(check.get('tolerance')))}</td>"
            f"<td>{esc(check.get('message') or '')}</td>"
            f"<td><small>{esc(check.get('failure_mode') or '')}</small></td>"
            "</tr>"
        )
    dvh_rows = "".join(
        f"<tr><td>{esc(d['structure'])}</td><td>{d['volume_cc']:.2f}</td>"
        f"<td>{d['min_gy']:.2f}</td><td>{d['mean_gy']:.2f}</td><td>{d['d95_percent_gy']:.2f}"
        f"</td><td>{d['d_003cc_gy']:.2f}</td><td>{d['max_gy']:.2f}</td></tr>"
        for d in report.get("dvh", [])
    )
    counts = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in report["counts"].items())
    outcome = report["outcome"]
    failures = "".join(
        f"<li>{esc(name)}: {esc(reason)}</li>"
        for name, reason in report.get("plugin_failures", {}).items()
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Plan check {esc(plan["label"])}: {esc(outcome)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 6px; vertical-align: top; font-size: 13px; }}
th {{ background: #f0f0f0; }}
.outcome {{ font-size: 1.4em; font-weight: bold; color: {_STATUS_COLOURS.get(outcome, "#000")}; }}
</style></head><body>
<h1>Plan check: {esc(plan["label"] or plan["sop_instance_uid"])}</h1>
<p class="outcome">Outcome: {esc(outcome)}</p>
<p>{esc(counts)}</p>
<p>Patient {esc(plan["patient_id"])} &middot; {esc(plan["modality"])}
&middot; {esc(", ".join(plan["radiation_types"]))} &middot; {plan["beams"]} beams
&middot; {esc(str(plan["prescription_gy"]))} Gy in {esc(str(plan["fractions"]))} fractions
&middot; profile {esc(report["profile"]["name"])} &middot; {esc(report["generated"])}</p>
{f"<p>Plugins whose checks are missing:</p><ul>{failures}</ul>" if failures else ""}
<table><thead><tr><th>check</th><th>status</th><th>measured</th><th>tolerance</th>
<th>message</th><th>failure mode (TG-275)</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table>
<h2>Dose-volume histograms</h2>
{_svg_dvh(report.get("dvh", []))}
<table><thead><tr><th>structure</th><th>volume (cc)</th><th>Dmin</th><th>Dmean</th>
<th>D95%</th><th>D0.03cc</th><th>Dmax</th></tr></thead><tbody>{dvh_rows}</tbody></table>
<p><small>Doses in Gy. rtauto plan_check {esc(report["plan_check_version"])},
report schema {esc(report["schema"])}.</small></p>
</body></html>
"""
