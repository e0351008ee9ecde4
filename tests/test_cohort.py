import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_manifest, write_nifti
from tumornet.errors import InputError
from tumornet.keys import patient_key
from tumornet.labels import DEFAULT_SCHEMA, MISSING, LabelSchema
from tumornet.manifest import read_manifest
from tumornet.scans import load_scan
from tumornet.split import patient_groups, split_patients, split_scan_ids
from tumornet.summary import format_summary, summarize


def test_valid_manifest_reads_labels_and_paths(subject):
    root, rows = subject
    cohort = read_manifest(write_manifest(root / "m.csv", rows))
    assert len(cohort.rows) == 2 and list(cohort.scans()) == ["S1"] and cohort.patients() == {"P1": ("S1",)}
    r1, r2 = cohort.rows
    assert r1.labels == {"tumor_type": 0, "area": 0, "left_right": 0, "front_rear": 0, "upper_lower": 0}
    assert r2.labels["area"] == MISSING and r2.labels["front_rear"] == MISSING and r2.labels["left_right"] == 1
    assert r1.image == (root / "img" / "s1.nii.gz").resolve()


def test_parquet_manifest_is_read_the_same(subject):
    root, rows = subject
    table = pa.Table.from_pylist([{k: (None if v == "" else str(v)) for k, v in r.items()} for r in rows])
    pq.write_table(table, root / "m.parquet")
    a = read_manifest(root / "m.parquet")
    b = read_manifest(write_manifest(root / "m.csv", rows))
    assert [r.labels for r in a.rows] == [r.labels for r in b.rows]


def test_load_scan_gives_tumors_with_labels_on_the_working_grid(subject):
    root, rows = subject
    cohort = read_manifest(write_manifest(root / "m.csv", rows))
    scan = load_scan(cohort.scans()["S1"], spacing_mm=2.0)
    assert scan.volume.spacing_mm == (2.0, 2.0, 2.0) and scan.instances.shape == scan.volume.shape
    assert [t.tumor_id for t in scan.tumors] == [1, 2]
    assert scan.tumors[1].labels["area"] == MISSING
    for t in scan.tumors:  # each box on the 2 mm grid holds its tumor's voxels
        sl = tuple(slice(int(a), int(b)) for a, b in zip(t.bbox[:3], t.bbox[3:], strict=True))
        assert (scan.instances[sl] == t.tumor_id).sum() == (scan.instances == t.tumor_id).sum() > 0


def test_tumor_values_column_turns_a_label_map_into_instances(tmp_path):
    seg = np.zeros((20, 20, 20), np.int16)
    seg[2:6, 2:6, 2:6] = 3  # 64 voxels: tumor 1
    seg[12:14, 12:14, 12:14] = 1  # 8 voxels: tumor 2
    seg[15:19, 0:20, 0:20] = 2  # oedema, ignored
    write_nifti(tmp_path / "s.nii.gz", seg)
    write_nifti(tmp_path / "i.nii.gz", np.random.default_rng(0).normal(100, 5, (20, 20, 20)).astype(np.float32))
    base = {"patient_id": "P", "scan_id": "S", "image": "i.nii.gz", "mask": "s.nii.gz", "tumor_values": "1 3"}
    cols = ["patient_id", "scan_id", "image", "mask", "tumor_id", "tumor_type", "area", "left_right",
            "front_rear", "upper_lower", "tumor_values"]
    m = write_manifest(tmp_path / "m.csv", [{**base, "tumor_id": 1}, {**base, "tumor_id": 2}], cols)
    scan = load_scan(read_manifest(m).rows)
    assert [round(t.volume_ml * 1000) for t in scan.tumors] == [64, 8]


def _expect(root, rows, match, columns=None):
    with pytest.raises(InputError, match=match):
        read_manifest(write_manifest(root / "m.csv", rows, columns))


def test_missing_and_unknown_columns(subject):
    root, rows = subject
    _expect(root, rows, r"m\.csv: missing column\(s\) \['tumor_id'\]",
            ["patient_id", "scan_id", "image", "mask", "tumor_type", "area", "left_right", "front_rear", "upper_lower"])
    cols = ["patient_id", "scan_id", "image", "mask", "tumor_id", "tumor_type", "area", "left_right",
            "front_rear", "upper_lower", "grade"]
    _expect(root, rows, r"unknown column\(s\) \['grade'\]", cols)


def test_info_columns_are_case_information_read_but_not_trained_on(subject):
    root, rows = subject
    cols = ["patient_id", "scan_id", "image", "mask", "tumor_id", "tumor_type", "area", "left_right",
            "front_rear", "upper_lower", "info_outcome", "info_dose_gy"]
    told = [{**rows[0], "info_outcome": " controlled at 24 months ", "info_dose_gy": "20"}, {**rows[1]}]
    cohort = read_manifest(write_manifest(root / "m.csv", told, cols))
    assert cohort.rows[0].info == {"info_outcome": "controlled at 24 months", "info_dose_gy": "20"}
    assert cohort.rows[1].info == {}  # empty cells: no information
    assert cohort.rows[0].labels == read_manifest(write_manifest(root / "n.csv", rows)).rows[0].labels
    summary = summarize(cohort, measure=False)  # how many tumors have each, never the values
    assert summary["info"] == {"info_dose_gy": 1, "info_outcome": 1}
    text = format_summary(summary)
    assert "case information: info_dose_gy 1 of 2 tumors, info_outcome 1 of 2 tumors" in text
    assert "controlled" not in text
    # a cell that holds the patient id is refused, naming the row and column and not the id
    pid = {"patient_id": "PAT-0042"}
    with pytest.raises(InputError, match=r"m\.csv row 2 column 'info_outcome': holds the patient id") as e:
        read_manifest(write_manifest(root / "m.csv", [{**told[0], **pid}, {**rows[1], **pid,
                                                                           "info_outcome": "see PAT-0042"}], cols))
    assert "PAT-0042" not in str(e.value)
    _expect(root, rows, r"unknown column\(s\) \['info_'\].*columns named info_\*", [*cols[:10], "info_"])


def test_class_names_are_matched_regardless_of_case_and_separators(subject):
    from retrieval.search import parse_where

    root, rows = subject
    loose = [{**rows[0], "tumor_type": "Metastasis", "left_right": " LEFT ", "area": "Skull base-CPA"}, rows[1]]
    r1 = read_manifest(write_manifest(root / "m.csv", loose)).rows[0]
    assert (r1.labels["tumor_type"], r1.labels["left_right"], r1.labels["area"]) == (0, 0, 10)
    _expect(root, [{**rows[0], "area": "skull base"}], r"column area: unknown class 'skull base'")
    assert parse_where(["tumor_type=Meningioma", "area=deep grey matter"], DEFAULT_SCHEMA) == {
        "tumor_type": 1, "area": 5}
    with pytest.raises(InputError, match="give a class"):
        parse_where(["tumor_type="], DEFAULT_SCHEMA)


def test_search_filters_on_case_information():
    from retrieval.search import _passes_where, parse_where

    where = parse_where(["info_outcome= Local control ", "tumor_type=metastasis"], DEFAULT_SCHEMA)
    assert where == {"info_outcome": "local control", "tumor_type": 0}
    row = {"label_tumor_type": 0, "info_outcome": "local control"}
    assert _passes_where(row, where) and _passes_where({**row, "info_outcome": "LOCAL CONTROL"}, where)
    assert not _passes_where({**row, "info_outcome": "progression"}, where)
    assert not _passes_where({**row, "info_outcome": None}, where) and not _passes_where({"label_tumor_type": 0}, where)
    assert not _passes_where({**row, "label_tumor_type": 1}, where)
    anything = parse_where(["info_outcome=*"], DEFAULT_SCHEMA)
    assert _passes_where({"info_outcome": "x"}, anything) and not _passes_where({"info_outcome": " "}, anything)
    with pytest.raises(InputError, match="give a value"):
        parse_where(["info_outcome="], DEFAULT_SCHEMA)
    with pytest.raises(InputError, match="info_\\* names are the manifest's case information"):
        LabelSchema.from_dict({"info_grade": ["low", "high"]})


def test_bad_cells_name_row_and_column(subject):
    root, rows = subject
    _expect(root, [rows[0], {**rows[1], "area": "kidney"}], r"m\.csv row 2 column area: unknown class 'kidney'")
    _expect(root, [{**rows[0], "tumor_id": "x"}], r"row 1 column 'tumor_id': expected a positive integer, got 'x'")
    _expect(root, [{**rows[0], "tumor_id": "0"}], r"row 1 column 'tumor_id'")
    _expect(root, [{**rows[0], "patient_id": ""}], r"row 1 column 'patient_id': empty")


def test_paths_must_exist_and_stay_inside_the_root(subject, tmp_path):
    root, rows = subject
    _expect(root, [{**rows[0], "image": "img/none.nii.gz"}], r"row 1 column 'image': file 'img/none.nii.gz' not found")
    _expect(root, [{**rows[0], "image": "../outside.nii.gz"}], r"row 1 column 'image': path .* escapes")
    _expect(root, [{**rows[0], "mask": str(root / "seg" / "s1.nii.gz")}], r"row 1 column 'mask': .*absolute")
    _expect(root, [{**rows[0], "mask": "seg/s1.txt"}], r"not a NIfTI file name")
    os.symlink("/etc/hostname", root / "img" / "link.nii.gz")
    _expect(root, [{**rows[0], "image": "img/link.nii.gz"}], r"escapes the manifest's folder")


def test_duplicates_and_inconsistent_scans(subject):
    root, rows = subject
    _expect(root, [rows[0], rows[0]], r"row 2: tumor_id 1 of this scan already on row 1")
    _expect(root, [rows[0], {**rows[1], "patient_id": "P2"}], r"row 2 column 'patient_id': differs from row 1")


def test_all_problems_are_reported_together(subject):
    root, rows = subject
    bad = [{**rows[0], "area": "kidney"}, {**rows[1], "tumor_id": "-3"}]
    with pytest.raises(InputError, match=r"2 problem\(s\)") as e:
        read_manifest(write_manifest(root / "m.csv", bad))
    assert "row 1" in str(e.value) and "row 2" in str(e.value) and "P1" not in str(e.value)


def test_empty_manifest_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="manifest not found"):
        read_manifest(tmp_path / "none.csv")
    with pytest.raises(InputError, match="no rows"):
        read_manifest(write_manifest(tmp_path / "e.csv", []))


def test_empty_mask_and_missing_tumor_id_name_the_file(subject):
    root, rows = subject
    write_nifti(root / "seg" / "empty.nii.gz", np.zeros((24, 28, 20), np.int16), np.diag([1.2, 1.0, 2.0, 1.0]))
    cohort = read_manifest(write_manifest(root / "m.csv", [{**rows[0], "mask": "seg/empty.nii.gz"}]))
    with pytest.raises(InputError, match=r"empty\.nii\.gz: empty mask"):
        load_scan(cohort.rows)
    cohort = read_manifest(write_manifest(root / "m.csv", [{**rows[0], "tumor_id": 5}]))
    with pytest.raises(InputError, match=r"s1\.nii\.gz \(manifest rows \[1\]\): tumor_id \[5\] not found"):
        load_scan(cohort.rows)


def test_custom_schema_adds_a_task(subject):
    root, rows = subject
    schema = LabelSchema.from_dict({"tumor_type": ["metastasis", "other"], "grade": ["low", "high"]})
    cols = ["patient_id", "scan_id", "image", "mask", "tumor_id", "tumor_type", "grade"]
    m = write_manifest(root / "m.csv", [{**rows[0], "grade": "high"}, {**rows[1], "grade": ""}], cols)
    cohort = read_manifest(m, schema)
    assert [r.labels for r in cohort.rows] == [{"tumor_type": 0, "grade": 1}, {"tumor_type": 0, "grade": MISSING}]


def test_split_is_by_patient_stratified_and_deterministic():
    groups = {f"p{i:03d}": ("a", "b", "c")[i % 3] for i in range(100)}
    train, test = split_patients(groups, test_fraction=0.2, seed=7)
    assert not set(train) & set(test) and len(train) + len(test) == 100
    assert 18 <= len(test) <= 22
    for g in "abc":
        n_g = sum(1 for p in test if groups[p] == g)
        assert abs(n_g - 0.2 * sum(1 for v in groups.values() if v == g)) <= 1
    shuffled = dict(reversed(list(groups.items())))
    assert split_patients(shuffled, test_fraction=0.2, seed=7) == (train, test)
    assert split_patients(groups, test_fraction=0.2, seed=8)[1] != test


def test_split_keeps_all_scans_of_a_patient_together(small_cohort):
    cohort = read_manifest(small_cohort)
    train, test = split_patients(patient_groups(cohort), seed=0)
    scans_train, scans_val, scans_test = split_scan_ids(cohort, seed=0)
    assert scans_train == sorted(s for p in train for s in cohort.patients()[p])
    assert scans_test == sorted(s for p in test for s in cohort.patients()[p])
    assert not set(scans_train) & set(scans_test)
    assert set(scans_train) | set(scans_test) == set(cohort.scans()) and scans_val == []


def test_a_validation_split_leaves_the_test_patients_unchanged(small_cohort):
    from tumornet.split import patient_sides

    cohort = read_manifest(small_cohort)
    plain = patient_sides(cohort, seed=0)
    with_val = patient_sides(cohort, seed=0, validation_fraction=0.25)
    assert with_val["test"] == plain["test"] and plain["validation"] == []
    # 25 % of all patients, drawn from the 19 training patients (rounded per tumor-type stratum)
    assert abs(len(with_val["validation"]) - 0.25 / 0.8 * len(plain["train"])) <= 2
    assert sorted(with_val["train"] + with_val["validation"]) == plain["train"]
    with pytest.raises(InputError, match="validation_fraction"):
        patient_sides(cohort, validation_fraction=0.9)


def test_patient_key_is_keyed_and_stable():
    k = patient_key("BraTS-MET-00001", b"site-secret")
    assert k == patient_key("BraTS-MET-00001", b"site-secret") and len(k) == 16
    assert k != patient_key("BraTS-MET-00001", b"other") and "00001" not in k
    with pytest.raises(InputError):
        patient_key("x", b"")


def test_tumor_id_overflow_is_a_clear_error(subject):
    root, rows = subject
    _expect(root, [{**rows[0], "tumor_id": "inf"}], r"row 1 column 'tumor_id': expected a positive integer, got 'inf'")
    _expect(root, [{**rows[0], "tumor_id": "1.5"}], r"got '1.5'")
