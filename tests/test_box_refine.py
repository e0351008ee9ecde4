"""refine_box: a drawn box replaced by the box of what the segmentation head finds in it (the
retrieval recipe's search-time `refine_box`), with a stand-in network whose foreground is known."""

import numpy as np
import pytest
import torch

from tumornet.descriptor import refine_box
from tumornet.errors import InputError
from tumornet.labels import DEFAULT_SCHEMA
from tumornet.network import MultitaskNet, NetConfig
from tumornet.recipe import SEARCH_ONLY, RetrievalConfig


class _Bright(torch.nn.Module):
    def forward(self, f):  # background logit 0.5, tumor logit the intensity
        return torch.cat([torch.full_like(f, 0.5), f], 1)


def _bright_model() -> MultitaskNet:
    """A network whose segmentation calls tumor every voxel brighter than 0.5 of its input patch."""
    model = MultitaskNet(NetConfig(channels=4, blocks=1), DEFAULT_SCHEMA)
    model.features = lambda x, frames: x
    model.seg_head = _Bright()
    return model


def test_a_drawn_box_becomes_the_found_tumors_box_and_a_grazed_neighbour_stays_out():
    image = np.zeros((48, 48, 48), np.float32)
    image[20:26, 18:24, 21:25] = 1.0  # the tumor: box (20, 18, 21, 26, 24, 25)
    image[29:33, 20:24, 21:25] = 1.0  # a neighbour that a loose box grazes, not touching the tumor
    model = _bright_model()
    drawn = np.array([17, 15, 18, 30, 27, 28])  # too large on every side; reaches into the neighbour
    assert refine_box(model, image, drawn, patch_size=32).tolist() == [20, 18, 21, 26, 24, 25]
    # too small, off centre: the whole component the core reaches, also outside the drawn box
    assert refine_box(model, image, [21, 19, 22, 24, 22, 24], patch_size=32).tolist() == [20, 18, 21, 26, 24, 25]
    # nothing found (or a speck under 5 % of the box): the drawn box is kept
    empty = [2, 2, 2, 10, 10, 10]
    assert refine_box(model, image, empty, patch_size=32).tolist() == empty
    image[5, 5, 5] = 1.0
    assert refine_box(model, image, empty, patch_size=32).tolist() == empty


def test_refine_box_is_a_search_time_switch():
    assert RetrievalConfig().refine_box is False and "refine_box" in SEARCH_ONLY  # archives stay valid
    with pytest.raises(InputError, match=r"retrieval\.refine_box: expected true or false, got 'yes'"):
        RetrievalConfig(refine_box="yes")
