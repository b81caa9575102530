"""The SYNTHETIC phantom: ground truth agrees with the label maps, files are valid DICOM, seeds reproduce."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from cspine.domain import MEASURED_LEVELS, SeriesRole
from cspine.phantom.anatomy import Label, level_code, sample_spine
from cspine.phantom.generate import (
    TUMOR_FREE_SHARE,
    PhantomOptions,
    build_case,
    draw_subtype,
)
from cspine.phantom.scanner import Scene, Shift
from cspine.phantom.truth import spine_truth, tumor_truth
from cspine.phantom.tumors import (
    SUBTYPES,
    TumorClass,
    TumorSubtype,
    place_tumor,
    plan_tumor,
    subtypes_of,
)

TUMOR_CASES = ["malignant", "benign", "borderline"]


def _voxel_coordinates(series: dict, indices: np.ndarray) -> np.ndarray:
    """Patient mm of (k, i, j) voxel indices of a CT/MR series described in truth.json."""
    origin = np.array(series["origin_mm"])
    row, col = np.array(series["row_direction"]), np.array(series["column_direction"])
    normal = np.cross(row, col)
    ps = series["pixel_spacing_mm"]
    return (
        origin
        + indices[:, :1] * series["slice_spacing_mm"] * normal
        + indices[:, 1:2] * ps[0] * col
        + indices[:, 2:3] * ps[1] * row
    )


def _sample(labels: np.ndarray, series: dict, points: np.ndarray) -> np.ndarray:
    """Nearest-voxel labels at patient points (0 outside the volume)."""
    origin = np.array(series["origin_mm"])
    row, col = np.array(series["row_direction"]), np.array(series["column_direction"])
    normal = np.cross(row, col)
    ps = series["pixel_spacing_mm"]
    d = points.reshape(-1, 3) - origin
    kij = np.stack([d @ normal / series["slice_spacing_mm"], d @ col / ps[0], d @ row / ps[1]])
    out = ndimage.map_coordinates(labels, kij, order=0, mode="constant", cval=0)
    return out.reshape(points.shape[:-1])


def _plane(level: dict, half: float = 25.0, step: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points of the plane through a body's centre, perpendicular to its axis; and its u, v grids."""
    centre, w = np.array(level["body_centre_mm"]), np.array(level["body_axis"])
    v = np.array([0.0, 1.0, 0.0]) - w * w[1]
    v /= np.linalg.norm(v)
    u = np.cross(v, w)
    s = np.arange(-half, half + 1e-9, step)
    uu, vv = np.meshgrid(s, s, indexing="ij")
    return centre + uu[..., None] * u + vv[..., None] * v, uu, vv


@pytest.mark.parametrize("name", TUMOR_CASES)
def test_lesion_volume_and_centre_in_truth_match_the_ct_label_map(phantom_cases, name):
    case = phantom_cases[name]
    lesion, ct = case.truth["tumor"], case.truth["series"]["ct"]
    mask = case.labels["ct_labels"] == Label.TUMOR
    voxel_ml = ct["pixel_spacing_mm"][0] * ct["pixel_spacing_mm"][1] * ct["slice_spacing_mm"] / 1000.0
    assert mask.sum() * voxel_ml == pytest.approx(lesion["volume_ml"], rel=0.15, abs=0.08)
    centroid = _voxel_coordinates(ct, np.argwhere(mask)).mean(axis=0)
    weights = np.array([c["volume_ml"] for c in lesion["components"]])
    truth_centroid = (np.array([c["centre_mm"] for c in lesion["components"]]) * weights[:, None]).sum(
        0
    ) / weights.sum()
    assert np.linalg.norm(centroid - truth_centroid) < 2.0


@pytest.mark.parametrize("name", TUMOR_CASES)
def test_lesion_levels_in_truth_match_the_label_map_levels(phantom_cases, name):
    case = phantom_cases[name]
    lesion = case.truth["tumor"]
    levels = case.labels["ct_levels"][case.labels["ct_labels"] == Label.TUMOR]
    counts = np.bincount(levels, minlength=9)
    assert int(np.argmax(counts)) == level_code(lesion["primary_level"])
    for name_ in lesion["levels"]:
        assert counts[level_code(name_)] > 0.05 * counts.sum()


@pytest.mark.parametrize("name", ["none", "malignant"])
def test_canal_and_cord_areas_in_truth_match_the_ct_label_map(phantom_cases, name):
    case = phantom_cases[name]
    ct = case.truth["series"]["ct"]
    for level_name in MEASURED_LEVELS:
        level = case.truth["levels"][level_name]
        points, _, _ = _plane(level, step=0.2)
        labels = _sample(case.labels["ct_labels"], ct, points)
        canal = np.isin(labels, (Label.CSF, Label.CORD)).sum() * 0.04
        cord = (labels == Label.CORD).sum() * 0.04
        assert canal == pytest.approx(level["canal_area_mm2"], rel=0.12, abs=10.0), level_name
        assert cord == pytest.approx(level["cord_area_mm2"], rel=0.15, abs=6.0), level_name


@pytest.mark.parametrize("name", ["none", "benign"])
def test_disc_heights_in_truth_match_the_mr_label_map(phantom_cases, name):
    case = phantom_cases[name]
    mr = case.truth["series"]["mr_t1"]
    for level_name in MEASURED_LEVELS:
        level = case.truth["levels"][level_name]
        t = np.arange(-10.0, 10.0, 0.05)
        line = np.array(level["disc_centre_mm"]) + t[:, None] * np.array(level["disc_axis"])
        labels = _sample(case.labels["mr_labels"], mr, line)
        inside = labels == Label.DISC
        # the contiguous run of disc samples around the centre
        lo, hi = len(t) // 2, len(t) // 2
        while lo > 0 and inside[lo - 1]:
            lo -= 1
        while hi < len(t) - 1 and inside[hi + 1]:
            hi += 1
        measured = (hi - lo + 1) * 0.05 if inside[len(t) // 2] else 0.0
        assert measured == pytest.approx(level["disc_height_mm"], abs=1.3), level["disc"]


def _inferior_endplate_tilt(labels: np.ndarray, levels: np.ndarray, code: int, row_sign: float) -> float:
    """Forward lean (deg) of a body's inferior endplate on the radiograph label map: a line fitted to the
    lowest body pixel of each column over the middle half of the body, refitted without the columns
    where the side of a tilted body, not its endplate, is lowest."""
    rows, cols = np.nonzero((labels == Label.VERTEBRAL_BODY) & (levels == code))
    columns = np.unique(cols)
    lo, hi = np.percentile(columns, [15, 85])
    keep = columns[(columns >= lo) & (columns <= hi)]
    bottom = np.array([rows[cols == c].max() for c in keep], dtype=float)
    y, z = keep * row_sign, -bottom  # posterior and superior, in (square) pixels
    for _ in range(3):
        slope, intercept = np.polyfit(y, z, 1)
        inliers = np.abs(z - (slope * y + intercept)) < 1.5
        y, z = y[inliers], z[inliers]
    return float(np.degrees(np.arctan(np.polyfit(y, z, 1)[0])))


@pytest.mark.parametrize("name", ["none", "benign", "borderline"])
def test_cobb_angle_in_truth_matches_the_radiograph_label_map(phantom_cases, name):
    case = phantom_cases[name]
    xr = case.truth["series"]["xr"]
    row_sign = float(np.sign(xr["row_direction"][1]))
    tilt = {
        n: _inferior_endplate_tilt(case.labels["xr_labels"], case.labels["xr_levels"], level_code(n), row_sign)
        for n in ("C2", "C7")
    }
    # 0.5 mm pixels over a ~15 mm endplate: about ±2° per endplate from the pixel staircase alone
    assert tilt["C7"] - tilt["C2"] == pytest.approx(case.truth["cobb_angle_c2_c7_deg"], abs=4.0)


def test_opll_occupying_ratio_in_truth_matches_the_ct_label_map(phantom_cases):
    case = phantom_cases["none"]
    opll, ct = case.truth["opll"], case.truth["series"]["ct"]
    assert opll["present"] and opll["levels"]
    ratios = []
    for level_name in opll["levels"]:
        points, uu, _ = _plane(case.truth["levels"][level_name], step=0.1)
        midline = np.abs(uu[:, 0]) < 0.05
        labels = _sample(case.labels["ct_labels"], ct, points[midline][0])
        thickness = (labels == Label.OPLL).sum()
        canal = np.isin(labels, (Label.OPLL, Label.CSF, Label.CORD)).sum()
        ratios.append(thickness / canal)
    assert max(ratios) == pytest.approx(opll["occupying_ratio"], abs=0.07)


def test_truth_records_what_the_issue_requires(phantom_cases):
    truth = phantom_cases["malignant"].truth
    assert truth["synthetic"] is True
    lesion = truth["tumor"]
    assert lesion["class"] == "malignant" and SUBTYPES[TumorSubtype(lesion["subtype"])].tumor_class.value == "malignant"
    assert lesion["levels"] and lesion["max_diameter_mm"] > 5 and lesion["volume_ml"] > 0.05
    assert len(lesion["centre_mm"]) == 3
    assert -40 < truth["cobb_angle_c2_c7_deg"] < 60
    for name in MEASURED_LEVELS:
        level = truth["levels"][name]
        assert 100 < level["canal_area_mm2"] < 400 and 0 < level["cord_area_mm2"] < 120
        assert 1.0 < level["disc_height_mm"] < 9.0
    assert set(truth["opll"]) >= {"present", "occupying_ratio", "levels"}
    first = pydicom.dcmread(phantom_cases["malignant"].files("ct")[0], stop_before_pixels=True)
    assert first.StudyInstanceUID == truth["study_instance_uid"]
    assert phantom_cases["none"].truth["tumor"] is None


def test_every_phantom_file_passes_dciodvfy_without_errors(phantom_cases):
    assert shutil.which("dciodvfy"), "dciodvfy (Debian package dicom3tools) must be installed: make sysdeps"
    errors = []
    checked = 0
    for case in phantom_cases.values():
        for path in sorted(case.path.rglob("*.dcm")):
            result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
            checked += 1
            errors += [
                f"{path.name}: {line}"
                for line in (result.stdout + result.stderr).splitlines()
                if line.startswith("Error")
            ]
    assert checked > 300
    assert not errors, "\n".join(errors[:20])


def test_every_series_says_it_is_synthetic(phantom_cases):
    for case in phantom_cases.values():
        for role in case.truth["series"]:
            ds = pydicom.dcmread(case.files(role)[0], stop_before_pixels=True)
            assert ds.SeriesDescription.startswith("SYNTHETIC")
            assert "SYNTHETIC" in str(ds.PatientName) and "SYNTHETIC" in ds.ImageComments
            assert "SYNTHETIC" in ds.StudyDescription


def test_stored_pixels_and_geometry_reproduce_the_rendered_ct(phantom_cases):
    case = phantom_cases["benign"]
    rendered = case.case.series[SeriesRole.CT]
    datasets = [pydicom.dcmread(p) for p in case.files("ct")]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])
    inside = (rendered.values > -1000) & (rendered.values < 3000)
    assert np.abs(hu - rendered.values)[inside].max() <= float(datasets[0].RescaleSlope) / 2 + 1e-3
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    assert np.allclose(np.diff(positions[:, 2]), rendered.slice_spacing, atol=1e-4)
    assert float(datasets[0].PixelSpacing[0]) == pytest.approx(rendered.pixel_spacing[0], abs=1e-5)


def test_same_seed_gives_the_same_anatomy_whatever_modalities_are_drawn(phantom_cases):
    reference = phantom_cases["none"]
    again = build_case("none", 11, 3, PhantomOptions(tumor="none", opll="yes", modalities=("xr",)))
    assert spine_truth(again.scene) == {k: reference.truth[k] for k in spine_truth(again.scene)}
    assert np.array_equal(again.series[SeriesRole.XR].values, reference.case.series[SeriesRole.XR].values)
    assert np.array_equal(again.series[SeriesRole.XR].labels, reference.labels["xr_labels"])


@pytest.mark.parametrize("subtype", list(TumorSubtype))
def test_every_subtype_places_a_lesion_of_its_class(subtype):
    rng = np.random.default_rng(list(TumorSubtype).index(subtype))
    plan = plan_tumor(rng, subtype, 0.5)
    spine = sample_spine(rng, plan.collapse)
    tumor = place_tumor(rng, plan, spine, 0.5)
    lesion = tumor_truth(Scene(spine, tumor))
    assert lesion is not None and lesion["volume_ml"] > 0.02
    assert lesion["class"] == SUBTYPES[subtype].tumor_class.value
    assert lesion["primary_level"] in SUBTYPES[subtype].levels or SUBTYPES[subtype].site.value == "canal"


def test_subtypes_cover_every_class_and_their_sizes_overlap_across_classes():
    assert len(SUBTYPES) >= 8
    ranges = {}
    for cls in TumorClass:
        members = subtypes_of(cls)
        assert len(members) >= 2, cls
        ranges[cls] = [
            (SUBTYPES[s].diameter_mm[0] * np.exp(-s_), SUBTYPES[s].diameter_mm[0] * np.exp(s_))
            for s in members
            for s_ in [SUBTYPES[s].diameter_mm[1]]
        ]
    for a in TumorClass:
        for b in TumorClass:
            if a is not b:  # some subtype of a and some of b share sizes within one log-sd
                assert any(lo1 < hi2 and lo2 < hi1 for lo1, hi1 in ranges[a] for lo2, hi2 in ranges[b])


def test_random_tumor_draws_no_tumor_at_the_documented_rate():
    rng = np.random.default_rng(0)
    draws = [draw_subtype(rng, "random") for _ in range(4000)]
    assert sum(d is None for d in draws) / len(draws) == pytest.approx(TUMOR_FREE_SHARE, abs=0.02)
    drawn = {d for d in draws if d is not None}
    assert drawn == set(TumorSubtype)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"modalities": ("ct", "pet")}, "modalities"),
        ({"tumor": "lipoma"}, "tumor must be one of"),
        ({"difficulty": 1.5}, r"difficulty must be in \[0, 1\]"),
        ({"opll": "maybe"}, "opll must be one of"),
        ({"matrix": "huge"}, "matrix must be one of phantom, real"),
        ({"site": "nowhere"}, "unknown site 'nowhere': known sites are default, "),
    ],
)
def test_phantom_options_reject_bad_values_with_a_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PhantomOptions(**kwargs)


def test_shift_parses_knobs_and_names_a_bad_one():
    assert Shift.parse("noise=2,resolution=1.5,contrast=0.8,thickness=3") == Shift(2.0, 1.5, 0.8, 3.0)
    assert Shift.parse("") == Shift()
    with pytest.raises(ValueError, match="bad shift 'gamma=2'"):
        Shift.parse("gamma=2")
    with pytest.raises(ValueError, match="'x' is not a number"):
        Shift.parse("noise=x")


def _cspine(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cspine", *args], capture_output=True, text=True, timeout=300)


def test_cli_phantom_writes_a_cohort_with_truth_and_manifest(tmp_path):
    out = tmp_path / "cohort"
    result = _cspine(
        "phantom", "--out", str(out), "--cases", "2", "--seed", "3", "--modalities", "xr", "--tumor", "none", "--quiet"
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 2 SYNTHETIC case(s)" in result.stdout
    manifest = json.loads((out / "cohort.json").read_text())
    assert manifest["synthetic"] is True and [c["class"] for c in manifest["cases"]] == ["none", "none"]
    for case in manifest["cases"]:
        case_dir = out / case["case_id"]
        assert len(list((case_dir / "xr").glob("*.dcm"))) == 1
        assert json.loads((case_dir / "truth.json").read_text())["tumor"] is None
        assert not (case_dir / "ct").exists()
        with np.load(case_dir / "labels.npz") as npz:
            assert set(npz.files) == {"xr_labels", "xr_levels"}


def test_cli_phantom_names_a_bad_option_and_exits_2(tmp_path):
    result = _cspine("phantom", "--out", str(tmp_path / "x"), "--shift", "noise=abc")
    assert result.returncode == 2
    assert "bad shift 'noise=abc'" in result.stderr
    assert "Traceback" not in result.stderr
