import numpy as np
import pytest
import torch

from conftest import write_manifest
from tumornet.cache import prepare_scan
from tumornet.errors import InputError
from tumornet.export import export_model, load_model, model_id
from tumornet.labels import DEFAULT_SCHEMA
from tumornet.manifest import read_manifest
from tumornet.network import MultitaskNet, NetConfig
from tumornet.scans import load_scan
from tumornet.tumors import tumor_extent


def test_cache_round_trip_and_hit(subject, tmp_path):
    root, rows = subject
    cohort = read_manifest(write_manifest(root / "m.csv", rows))
    scan_rows = cohort.scans()["S1"]
    a = prepare_scan(scan_rows, spacing_mm=2.0, cache_dir=tmp_path / "c")
    image, inst = a.arrays()
    direct = load_scan(scan_rows, spacing_mm=2.0)
    assert np.array_equal(image, direct.volume.array) and np.array_equal(inst, direct.instances)
    assert [t.bbox.tolist() for t in a.tumors] == [t.bbox.tolist() for t in direct.tumors]
    # each tumor's extent as its mask measures it (what the recipe's box size reads at export)
    assert all(np.allclose(t.extent, tumor_extent(d, direct.volume.affine, direct.volume.array.shape))
               for t, d in zip(a.tumors, direct.tumors, strict=True))
    assert a.tumors[1].labels["area"] == -1
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert len(files) == 3 and not any("S1" in f or "P1" in f for f in files)  # no ids in file names
    mtime = a.image_path.stat().st_mtime_ns
    b = prepare_scan(scan_rows, spacing_mm=2.0, cache_dir=tmp_path / "c")  # a hit: nothing rewritten
    assert b.key == a.key and b.image_path.stat().st_mtime_ns == mtime
    assert prepare_scan(scan_rows, spacing_mm=3.0, cache_dir=tmp_path / "c").key != a.key


def test_export_round_trip_with_weights_only(tmp_path):
    torch.manual_seed(0)
    m = MultitaskNet(NetConfig(channels=8, blocks=1), DEFAULT_SCHEMA)
    mid = export_model(m, tmp_path / "m.pt", extra={"spacing_mm": [np.float64(2.0)] * 3})
    m2, meta = load_model(tmp_path / "m.pt")
    assert meta["model_id"] == mid == model_id(m.state_dict())
    assert meta["extra"]["spacing_mm"] == [2.0, 2.0, 2.0]
    x = torch.randn(12, 12, 12)
    m.eval()
    assert torch.allclose(m.embed(x, [[1, 1, 1, 6, 6, 6]]), m2.embed(x, [[1, 1, 1, 6, 6, 6]]))


def test_export_rejects_tampered_and_foreign_files(tmp_path):
    m = MultitaskNet(NetConfig(channels=8, blocks=1), DEFAULT_SCHEMA)
    export_model(m, tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["state_dict"]["task_heads.area.bias"] += 1.0
    torch.save(payload, tmp_path / "t.pt")
    with pytest.raises(InputError, match="do not match the recorded model id"):
        load_model(tmp_path / "t.pt")
    torch.save({"hello": 1}, tmp_path / "f.pt")
    with pytest.raises(InputError, match="not a tumornet-model-v1 file"):
        load_model(tmp_path / "f.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "e.pt")
    with pytest.raises(InputError, match="not a loadable model file"):
        load_model(tmp_path / "e.pt")
    with pytest.raises(InputError, match="model file not found"):
        load_model(tmp_path / "none.pt")
