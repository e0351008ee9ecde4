from pathlib import Path

import pytest

from tumornet.config import load_config
from tumornet.errors import InputError
from tumornet.labels import DEFAULT_SCHEMA

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["demo.yaml", "paper.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.tasks == DEFAULT_SCHEMA and cfg.phantom.patients > 0


def test_overrides_apply_and_are_typed():
    cfg = load_config(CONFIGS / "demo.yaml", ["phantom.patients=7", "data.spacing_mm=[1.0, 1.0, 2.0]"])
    assert cfg.phantom.patients == 7 and cfg.data.spacing_mm == (1.0, 1.0, 2.0)


def test_errors_name_file_and_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("phantom:\n  patinets: 3\n")
    with pytest.raises(InputError, match=r"c\.yaml: phantom\.patinets: unknown key"):
        load_config(p)
    p.write_text("phantom:\n  patients: many\n")
    with pytest.raises(InputError, match=r"phantom\.patients: expected int, got str 'many'"):
        load_config(p)
    p.write_text("trainer: {}\n")
    with pytest.raises(InputError, match=r"trainer: unknown key"):
        load_config(p)
    p.write_text("data:\n  test_fraction: 1.5\n")
    with pytest.raises(InputError, match=r"data\.test_fraction"):
        load_config(p)
    p.write_text("tasks:\n  tumor_type: [a]\n")
    with pytest.raises(InputError, match=r"task 'tumor_type': needs at least 2 classes"):
        load_config(p)
    p.write_text("a: [\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(InputError, match=r"override 'phantom\.patients': expected key=value"):
        load_config(CONFIGS / "demo.yaml", ["phantom.patients"])


def test_sites_define_their_own_tasks(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("tasks:\n  tumor_type: [metastasis, meningioma, schwannoma, glioma]\n  grade: [low, high]\n")
    cfg = load_config(p)
    assert cfg.tasks.names == ("tumor_type", "grade") and cfg.tasks["tumor_type"].n_classes == 4
