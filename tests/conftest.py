"""Shared fixtures: tiny synthetic NIfTI subjects written to tmp_path (torchio-style)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tumornet.io import write_table_csv
from tumornet.labels import DEFAULT_SCHEMA
from tumornet.manifest import manifest_columns
from tumornet.synth.phantom import PhantomConfig, generate_cohort


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
    """A manifest CSV of the default schema (or of exactly `columns`, to write broken ones)."""
    return write_table_csv(path, rows, columns or manifest_columns(DEFAULT_SCHEMA))


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
    return generate_cohort(PhantomConfig(patients=24, seed=3, voxel_mm=4.0, workers=2), out, log=lambda *_: None)


ROOT = Path(__file__).resolve().parent.parent
RAY_PORT, DASHBOARD_PORT, AGENT_PORT, CLIENT_PORT = "6391", "8271", "52391", "9991"


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """One local Ray head (cluster/local.sh) for every Ray test of the run; its own temp dir and ports."""
    import ray

    temp = tmp_path_factory.mktemp("ray")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # one auth mode for the head, this client and job submit
    env = {**os.environ, "RAY": str(Path(sys.executable).parent / "ray"), "NUM_CPUS": "2", "RAY_PORT": RAY_PORT,
           "DASHBOARD_PORT": DASHBOARD_PORT, "AGENT_PORT": AGENT_PORT, "CLIENT_PORT": CLIENT_PORT}
    subprocess.run([str(ROOT / "cluster" / "local.sh"), "start", str(temp)], env=env, check=True,
                   capture_output=True, timeout=180)
    ray.init(address=f"127.0.0.1:{RAY_PORT}")
    yield env
    ray.shutdown()
    # only this head: a Ray the user runs beside the tests keeps running
    subprocess.run([str(ROOT / "cluster" / "local.sh"), "stop", str(temp)], env=env, capture_output=True, timeout=120)


SECRET = b"0123456789abcdef-site-key"


def model_with_split(path, cohort, *, seed=0, test_fraction=0.2, channels=8):
    """A random model whose file records the split (seed, fraction) of `cohort`, as training writes it."""
    import torch

    from tumornet.export import export_model
    from tumornet.network import MultitaskNet, NetConfig
    from tumornet.split import record_split

    torch.manual_seed(0)
    model = MultitaskNet(NetConfig(channels=channels, blocks=1), DEFAULT_SCHEMA).eval()
    split = record_split(cohort, test_fraction=test_fraction, seed=seed)
    return model, export_model(model, path, extra={"spacing_mm": [4.0] * 3, "patch_size": 16, "split": split,
                                                   "run": "test", "steps": 0})


@pytest.fixture(scope="session")
def archive(tmp_path_factory, small_cohort):
    """The small cohort embedded without Ray (the job's per-scan function) by a random 8-channel model
    recording a 25 % held-out split: <root>/model.pt, <root>/emb/."""
    from embedder.embed import embed_scan
    from embedder.shards import model_shard_schema, write_shard
    from tumornet.manifest import read_manifest
    from tumornet.recipe import RetrievalConfig

    root = tmp_path_factory.mktemp("archive")
    model, mid = model_with_split(root / "model.pt", read_manifest(small_cohort), test_fraction=0.25)
    rows = [r for scan in read_manifest(small_cohort).scans().values()
            for r in embed_scan(model, mid, scan, spacing_mm=4.0, patch_size=16, secret=SECRET)]
    write_shard(rows, root / "emb" / "s.parquet", model_shard_schema(model, RetrievalConfig()))
    return root
