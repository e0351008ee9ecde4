"""Which tumors the training patches are cut around (trainer.data.PatchStream): train.dark_weight."""

import numpy as np
import pytest

from tumornet.cache import CachedScan
from tumornet.config import TrainConfig
from tumornet.errors import InputError
from tumornet.patches import TumorBox
from tumornet.tumors import is_dark, tumor_contrast


def _scan(tmp_path, name: str, level: float) -> CachedScan:
    """A 32^3 scan of noise around 0 with one 8^3 tumor of mean `level` (z-score units)."""
    rng = np.random.default_rng(len(name))
    image = rng.normal(0.0, 0.1, (32, 32, 32)).astype(np.float32)
    instances = np.zeros((32, 32, 32), np.int32)
    instances[12:20, 12:20, 12:20] = 1
    image[instances == 1] += level
    np.save(tmp_path / f"{name}-image.npy", image)
    np.save(tmp_path / f"{name}-inst.npy", instances)
    tumor = TumorBox(tumor_id=1, bbox=np.array([12, 12, 12, 20, 20, 20]), labels={"tumor_type": int(level < 0)})
    return CachedScan(key=name, image_path=tmp_path / f"{name}-image.npy",
                      instances_path=tmp_path / f"{name}-inst.npy", tumors=(tumor,), spacing_mm=(2.0, 2.0, 2.0))


def test_contrast_tells_dark_tumors():
    image = np.zeros((20, 20, 20))
    inst = np.zeros((20, 20, 20), int)
    inst[8:12, 8:12, 8:12] = 1
    inst[2:5, 2:5, 2:5] = 2
    image[inst == 1] = 1.5
    image[inst == 2] = -0.4
    box1, box2 = [8, 8, 8, 12, 12, 12], [2, 2, 2, 5, 5, 5]
    assert tumor_contrast(image, inst, 1, box1) == pytest.approx(1.5)
    assert tumor_contrast(image, inst, 2, box2) == pytest.approx(-0.4)
    assert not is_dark(image, inst, 1, box1) and is_dark(image, inst, 2, box2)
    assert np.isnan(tumor_contrast(image, inst, 3, box1))  # no such tumor


def test_dark_tumors_are_picked_more_often(tmp_path):
    """dark_weight 4: of a bright and a dark tumor (one scan each), 4 of 5 patches are cut around the
    dark one; the default 1 keeps the sampling (and the batches) of before: a scan, then a tumor."""
    from trainer.data import PatchStream

    scans = [_scan(tmp_path, "bright", 1.5), _scan(tmp_path, "dark", -0.5)]

    def dark_share(weight: float) -> float:
        cfg = TrainConfig(batch_size=2, patch_size=16, dark_weight=weight, flip_lr=False)
        stream = PatchStream(scans, cfg, ["tumor_type"], rank=0, start_step=0, end_step=0)
        try:
            labels = np.concatenate([stream.batch_for(s)["labels"]["tumor_type"] for s in range(300)])
        finally:
            stream.close()
        return float(labels.mean())

    assert dark_share(1.0) == pytest.approx(0.5, abs=0.06)
    assert dark_share(4.0) == pytest.approx(0.8, abs=0.06)
    with pytest.raises(InputError, match=r"train\.dark_weight: must be > 0, got 0"):
        TrainConfig(dark_weight=0)
