"""The handcrafted baseline: eight numbers per tumor that a radiologist's tool would compute.

    log volume (ml) | centroid x, y, z (mm, RAS, relative to the centre of the head's foreground
    box, tumornet.volumes.head_box_voxels) | tumor intensity mean, sd, 10th and 90th
    percentile on the brain-normalized image (z-scores over the head's foreground)

The retrieval evaluation standardizes them on the training split and searches them with the same
KNN protocol as the learned embedding: the learned embedding is only worth shipping where it beats
this row. Stored in every shard row (`handcrafted` column) beside the embedding.
"""

from __future__ import annotations

import numpy as np

from .tumors import Tumor

FEATURES = ("log_volume_ml", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm",
            "intensity_mean", "intensity_sd", "intensity_p10", "intensity_p90")


def handcrafted_features(image_z: np.ndarray, instances: np.ndarray, tumor: Tumor, centre_mm: np.ndarray) -> np.ndarray:
    """(8,) float32 (see FEATURES) for one tumor; image_z and instances on the same grid."""
    values = image_z[instances == tumor.tumor_id]
    if values.size == 0:  # a tumor thinner than the working grid: the voxels of its box
        values = image_z[tuple(slice(int(a), int(b)) for a, b in zip(tumor.bbox[:3], tumor.bbox[3:], strict=True))]
    p10, p90 = np.percentile(values, [10, 90])
    rel = np.asarray(tumor.centroid_mm, dtype=np.float64) - centre_mm
    return np.array([np.log(max(tumor.volume_ml, 1e-6)), *rel, values.mean(), values.std(), p10, p90],
                    dtype=np.float32)
