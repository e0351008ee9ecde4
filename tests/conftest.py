"""Shared fixtures: tiny synthetic NIfTI subjects written to tmp_path (torchio-style)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tumornet.labels import DEFAULT_SCHEMA
from tumornet.phantom import PhantomConfig, generate_cohort


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None, dtype=None) -> Path:
    img = nib.Nifti1Image(array, np.eye(4) if affine is None else affine)
    if dtype is not None:
        img.set_data_dtype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def blob_subject(shape=(24, 28, 20), centers=((8, 9, 7), (16, 18, 13)), radii=(3, 4), seed=0):
    """Image with bright spheres on a noisy head-like background + its instance mask."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    image = 100 + rng.normal(0, 5, shape)
    mask = np.zeros(shape, dtype=np.int16)
    for i, (c, r) in enumerate(zip(centers, radii, strict=True), start=1):
        inside = np.sum((grid - np.asarray(c)) ** 2, -1) <= r**2
        image[inside] += 150
        mask[inside] = i
    return image.astype(np.float32), mask


def write_manifest(path: Path, rows: list[dict], columns=None) -> Path:
    columns = columns or ["patient_id", "scan_id", "image", "mask", "tumor_id", *DEFAULT_SCHEMA.names]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: skipped (not failed) on CPU machines."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def subject(tmp_path):
    """One scan with two tumors and a valid two-row manifest."""
    image, mask = blob_subject()
    affine = np.diag([1.2, 1.0, 2.0, 1.0])
    write_nifti(tmp_path / "img" / "s1.nii.gz", image, affine)
    write_nifti(tmp_path / "seg" / "s1.nii.gz", mask, affine)
    base = {"patient_id": "P1", "scan_id": "S1", "image": "img/s1.nii.gz", "mask": "seg/s1.nii.gz"}
    rows = [
        {**base, "tumor_id": 1, "tumor_type": "metastasis", "area": "frontal", "left_right": "left",
         "front_rear": "front", "upper_lower": "upper"},
        {**base, "tumor_id": 2, "tumor_type": "metastasis", "area": "", "left_right": "right",
         "front_rear": "", "upper_lower": "lower"},
    ]
    return tmp_path, rows


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory) -> Path:
    """A 4 mm synthetic cohort shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("cohort")
    return generate_cohort(PhantomConfig(patients=24, seed=3, spacing_mm=4.0, workers=2), out, log=lambda *_: None)


ROOT = Path(__file__).resolve().parent.parent
RAY_PORT, DASHBOARD_PORT = "6391", "8271"


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """One local Ray head (cluster/local.sh) for every Ray test of the run; its own temp dir and ports."""
    import ray

    temp = tmp_path_factory.mktemp("ray")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # one auth mode for the head, this client and job submit
    env = {**os.environ, "RAY": str(Path(sys.executable).parent / "ray"), "NUM_CPUS": "2", "RAY_PORT": RAY_PORT,
           "DASHBOARD_PORT": DASHBOARD_PORT}
    subprocess.run([str(ROOT / "cluster" / "local.sh"), "start", str(temp)], env=env, check=True,
                   capture_output=True, timeout=180)
    ray.init(address=f"127.0.0.1:{RAY_PORT}")
    yield env
    ray.shutdown()
    subprocess.run([str(ROOT / "cluster" / "local.sh"), "stop"], env=env, capture_output=True, timeout=120)
