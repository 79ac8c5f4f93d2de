"""The autocontour chain on CPU and, where PyTorch sees one, on a CUDA GPU.

    .venv/bin/python bench/autocontour_devices.py [--repeat 3]

Runs :func:`rtauto_autocontour.inference.segment` with the TorchScript demo model
(``demo-thorax-ts``) on a synthetic 512x512x177 CT held in memory, once per device, and prints
each stage's median seconds, the provider that ran the network, and the agreement of the
label maps (Dice per structure, GPU against CPU). Without a GPU it prints the CPU figures and
says so. Ratios are against the CPU run in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from rtauto_autocontour.backends import load_predictor
from rtauto_autocontour.inference import segment
from rtauto_autocontour.registry import ModelRegistry

from rtauto.dicom.geometry import Volume
from rtauto.testing import ct_phantom

ROOT = Path(__file__).resolve().parents[1]


def synthetic_volume() -> Volume:
    spacing = (0.8, 0.8, 2.0)
    hu = ct_phantom(512, 512, 177, spacing, seed=7).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-204.8, -204.8, -176.0)
    return Volume(
        array=hu,
        affine=affine,
        spacing=spacing,
        direction=np.eye(3),
        origin=affine[:3, 3].copy(),
        sop_instance_uids=[f"1.2.826.0.1.3680043.10.1.{k}" for k in range(177)],
        frame_of_reference_uid="1.2.826.0.1.3680043.10.2",
        study_instance_uid="1.2.826.0.1.3680043.10.3",
        series_instance_uid="1.2.826.0.1.3680043.10.4",
        patient_position="HFS",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    volume = synthetic_volume()
    model = ModelRegistry(ROOT / "models").resolve("demo-thorax-ts@latest")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if len(devices) == 1:
        print("PyTorch sees no CUDA device: CPU figures only")
    results: dict[str, dict[str, float]] = {}
    labels: dict[str, np.ndarray] = {}
    for device in devices:
        predictor = load_predictor(model, device=device)
        segment(volume, model.card, predictor, sw_batch_size=4)  # warm-up (kernels, caches)
        runs = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            result = segment(volume, model.card, predictor, sw_batch_size=4)
            runs.append({**result.timings, "total": time.perf_counter() - start})
        results[device] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        labels[device] = result.labels
        figures = ", ".join(f"{k} {v:.3f} s" for k, v in results[device].items())
        print(f"{device}: provider {result.provider}; {figures}")
    if "cuda" in results:
        cpu, gpu = results["cpu"], results["cuda"]
        print(
            f"GPU / CPU: network {gpu['network'] / cpu['network']:.3f}, "
            f"whole chain {gpu['total'] / cpu['total']:.3f}"
        )
        for index, spec in sorted(model.card.labels.items()):
            a, b = labels["cpu"] == index, labels["cuda"] == index
            dice = 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)
            print(f"  {spec.name}: Dice GPU vs CPU {dice:.5f}")


if __name__ == "__main__":
    main()
