"""Train rtauto's demo contouring model on procedurally generated CT-like phantoms.

    .venv/bin/python plugins/autocontour/scripts/train_demo_model.py --out models

writes ``models/demo-thorax/1/`` (ONNX, the backend the demo workflow uses) and
``models/demo-thorax-ts/1/`` (the same weights as TorchScript), each with its model card and
sha256. No real patient data is used: every phantom is drawn here, in patient space (LPS,
4 mm voxels), with varied body size, position, lungs, spine, spinal canal, couch and noise.

Reproducibility: ``--seed`` (default 20261122) seeds NumPy's generator for the phantoms and
PyTorch for the weights and the patch order; with the default settings the script takes a few
minutes on 2 CPU cores. Bit-identical weights need the same PyTorch build and thread count
(``--threads``, default 2): floating-point sums are not associative across thread splits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

SEED = 20261122
SPACING = 4.0  # mm, isotropic
PATCH = (64, 64, 16)  # i (to patient left), j (to posterior), k (to superior)
LABELS = {
    1: {"name": "Lung_L", "color": [0, 160, 255], "interpreted_type": "ORGAN"},
    2: {"name": "Lung_R", "color": [255, 200, 0], "interpreted_type": "ORGAN"},
    3: {"name": "SpinalCord", "color": [255, 0, 0], "interpreted_type": "OAR"},
}
for _spec in LABELS.values():
    _spec.update(largest_component=True, fill_holes=True)


def phantom(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One thorax-like phantom: HU (i, j, k) and labels (i, j, k), LPS axes, 4 mm voxels."""
    ni, nj, nk = int(rng.integers(64, 92)), int(rng.integers(56, 84)), int(rng.integers(20, 36))
    i, j, k = np.meshgrid(
        np.arange(ni, dtype=np.float32),
        np.arange(nj, dtype=np.float32),
        np.arange(nk, dtype=np.float32),
        indexing="ij",
    )
    x = (i - ni / 2) * SPACING  # mm, + = patient left
    y = (j - nj / 2) * SPACING  # mm, + = posterior
    z = k * SPACING  # mm, + = superior
    cx, cy = rng.uniform(-25, 25), rng.uniform(-20, 15)
    a, b = rng.uniform(110, 170), rng.uniform(75, 115)  # body semi-axes (mm)
    taper = 1 + rng.uniform(-0.08, 0.08) * np.sin(z / (nk * SPACING) * np.pi)
    xb, yb = (x - cx) / (a * taper), (y - cy) / (b * taper)
    body = xb**2 + yb**2 <= 1
    hu = np.full(i.shape, -1000.0, dtype=np.float32)
    hu[body] = rng.uniform(10, 50)
    labels = np.zeros(i.shape, dtype=np.int64)

    # lungs: ellipsoids either side of the mediastinum, apex inside the volume or above it
    z_low, z_high = rng.uniform(-30, 20), nk * SPACING + rng.uniform(-40, 40)
    z_mid, z_half = (z_low + z_high) / 2, (z_high - z_low) / 2
    for label, side in ((1, 1.0), (2, -1.0)):
        lx = cx + side * a * rng.uniform(0.40, 0.52)
        ly = cy - b * rng.uniform(0.0, 0.12)
        la, lb = a * rng.uniform(0.26, 0.36), b * rng.uniform(0.50, 0.66)
        lung = ((x - lx) / la) ** 2 + ((y - ly) / lb) ** 2 + ((z - z_mid) / z_half) ** 2 <= 1
        lung &= ((x - cx) / (a * taper * 0.93)) ** 2 + ((y - cy) / (b * taper * 0.93)) ** 2 <= 1
        hu[lung] = rng.uniform(-880, -760)
        labels[lung] = label

    # spine: vertebral body and a bony ring around the spinal canal, posterior in the body
    sx = cx + rng.uniform(-6, 6)
    vy = cy + b * rng.uniform(0.38, 0.5)
    vr = rng.uniform(13, 19)
    vertebra = ((x - sx) / vr) ** 2 + ((y - vy) / (vr * 0.8)) ** 2 <= 1
    canal_y = vy + vr * 0.8 + rng.uniform(6, 9)
    canal_r = rng.uniform(5, 8)
    ring = (x - sx) ** 2 + (y - canal_y) ** 2 <= (canal_r + rng.uniform(4, 7)) ** 2
    canal = (x - sx) ** 2 + (y - canal_y) ** 2 <= canal_r**2
    bone_hu = rng.uniform(350, 800)
    hu[(vertebra | ring) & body] = bone_hu
    hu[canal & body] = rng.uniform(20, 45)
    labels[canal & body] = 3

    # couch: a slab below the body (posterior), sometimes touching it
    top = cy + b + rng.uniform(0, 15)
    couch = (y >= top) & (y < top + rng.uniform(6, 15)) & (np.abs(x) < rng.uniform(200, 260))
    hu[couch & ~body] = rng.uniform(-200, 300)

    hu += rng.normal(0, rng.uniform(5, 30), hu.shape).astype(np.float32)
    return hu, labels


def normalise(hu: np.ndarray) -> np.ndarray:
    return np.clip((hu + 1000.0) / 2000.0, 0.0, 1.0).astype(np.float32)


def random_patch(
    rng: np.random.Generator, image: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A PATCH-sized crop, zero-padded (air after normalisation) where the phantom is smaller."""
    out_image = np.zeros(PATCH, dtype=np.float32)
    out_labels = np.zeros(PATCH, dtype=np.int64)
    src, dst = [], []
    for size, patch in zip(image.shape, PATCH, strict=True):
        if size >= patch:
            start = int(rng.integers(0, size - patch + 1))
            src.append(slice(start, start + patch))
            dst.append(slice(0, patch))
        else:
            offset = int(rng.integers(0, patch - size + 1))
            src.append(slice(0, size))
            dst.append(slice(offset, offset + size))
    out_image[tuple(dst)] = image[tuple(src)]
    out_labels[tuple(dst)] = labels[tuple(src)]
    return out_image, out_labels


def build_network() -> UNet:
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=len(LABELS) + 1,
        channels=(8, 16, 32, 64),
        strides=(2, 2, 2),
        num_res_units=0,
        # batch norm: inference uses the training statistics, so a patch that is mostly air
        # is not rescaled the way instance norm would rescale it
        norm="batch",
    )


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def card(name: str, backend: str, weights: Path, seed: int, iterations: int) -> dict:
    return {
        "name": name,
        "version": "1",
        "description": (
            "rtauto demo: lungs and spinal cord on thorax CT. Trained on procedural phantoms "
            "only; for testing rtauto's pipeline, never for clinical use."
        ),
        "backend": backend,
        "weights": weights.name,
        "sha256": sha256_of(weights),
        "input_modality": "CT",
        "orientation": "LPS",
        "spacing": [SPACING, SPACING, SPACING],
        "normalization": {"kind": "window", "low": -1000.0, "high": 1000.0},
        "patch_size": list(PATCH),
        "overlap": 0.25,
        "labels": LABELS,
        "license": "Apache-2.0",
        "training_data": (
            f"procedurally generated thorax phantoms (plugins/autocontour/scripts/"
            f"train_demo_model.py, seed {seed}, {iterations} iterations); no patient data"
        ),
        "references": ["https://docs.monai.io/en/stable/networks.html#unet"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models"), help="models folder")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--phantoms", type=int, default=48)
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    data = [phantom(rng) for _ in range(args.phantoms)]
    data = [(normalise(hu), labels) for hu, labels in data]
    print(f"{len(data)} phantoms in {time.perf_counter() - start:.1f} s", flush=True)

    network = build_network()
    optimiser = torch.optim.Adam(network.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, args.iterations)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    network.train()
    for iteration in range(1, args.iterations + 1):
        picks = rng.integers(0, len(data), args.batch)
        patches = [random_patch(rng, *data[p]) for p in picks]
        images = torch.from_numpy(np.stack([p[0] for p in patches])[:, None])
        targets = torch.from_numpy(np.stack([p[1] for p in patches])[:, None])
        optimiser.zero_grad()
        loss = loss_function(network(images), targets)
        loss.backward()
        optimiser.step()
        schedule.step()
        if iteration % 25 == 0 or iteration == 1:
            elapsed = time.perf_counter() - start
            print(f"iteration {iteration}: loss {loss.item():.4f} ({elapsed:.0f} s)", flush=True)

    network.eval()
    example = torch.zeros((1, 1, *PATCH))
    onnx_dir = args.out / "demo-thorax" / "1"
    ts_dir = args.out / "demo-thorax-ts" / "1"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    ts_dir.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        network,
        example,
        str(onnx_dir / "model.onnx"),
        dynamo=False,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
    )
    with torch.no_grad():
        torch.jit.trace(network, example).save(str(ts_dir / "model.ts"))
    for folder, name, backend, weights in (
        (onnx_dir, "demo-thorax", "onnx", onnx_dir / "model.onnx"),
        (ts_dir, "demo-thorax-ts", "torchscript", ts_dir / "model.ts"),
    ):
        text = yaml.safe_dump(
            card(name, backend, weights, args.seed, args.iterations), sort_keys=False
        )
        (folder / "model.yaml").write_text(text, encoding="utf-8")
        print(f"{folder}: {weights.stat().st_size / 1e6:.2f} MB, sha256 {sha256_of(weights)}")
    print(json.dumps({"seconds": round(time.perf_counter() - start, 1), "seed": args.seed}))


if __name__ == "__main__":
    main()
