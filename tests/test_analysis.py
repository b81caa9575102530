"""Measurements against analytic shapes and against the SYNTHETIC phantom's truth; fusion with every subset
of modalities. No Triton here: label maps are drawn by code or come from the phantom."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json

import numpy as np
import pytest

from cspine.analysis.alignment import cobb_angle, endplate_tilt, projection_sampler, snapped_tilt, wall_tilt
from cspine.analysis.canal import canal_section
from cspine.analysis.discs import disc_height
from cspine.analysis.fusion import (
    DETECTION_THRESHOLD,
    Calibration,
    DetectionCurve,
    assess,
    matched_lesions,
    matched_probabilities,
    modality_assessment,
    normalised_entropy,
    pool,
)
from cspine.analysis.lesions import measure_lesions
from cspine.analysis.levels import LevelFrame, frame_from_discs, frame_from_radiograph
from cspine.analysis.masks import LabelMasks
from cspine.analysis.spine import ModalitySpine, combine, opll_where_measured, unavailable_notices
from cspine.dicom.ingest import ingest_paths
from cspine.dicom.selection import select_series
from cspine.domain import (
    MEASURED_LEVELS,
    Assessment,
    Lesion,
    LevelMeasurement,
    Modality,
    ModalityResult,
    NoticeCode,
    OpllMeasurement,
    Reason,
    ReasonCode,
    SeriesRole,
    Volume,
)
from cspine.fewshot.prototypes import PrototypeSet, SupportSet
from cspine.inference.local_triton import default_repository
from cspine.inference.specs import SEG_LABELS
from cspine.modeling.data import model_labels


def axial_volume(voxels: np.ndarray, spacing: tuple[float, float, float]) -> Volume:
    """[K, R, C] axial slices going up (+z), rows toward posterior, columns toward the left."""
    k = voxels.shape[0]
    return Volume(
        voxels=voxels,
        origin=np.zeros(3),
        row_direction=np.array([1.0, 0.0, 0.0]),
        column_direction=np.array([0.0, 1.0, 0.0]),
        pixel_spacing=(spacing[1], spacing[2]),
        slice_offsets=np.arange(k) * spacing[0],
    )


def grid_points(volume: Volume) -> np.ndarray:
    k, r, c = volume.shape
    kij = np.stack(np.meshgrid(np.arange(k), np.arange(r), np.arange(c), indexing="ij"), axis=-1).reshape(-1, 3)
    return volume.index_to_patient(kij).reshape(k, r, c, 3)


# ------------------------------------------------------------------------------------------------------
# Analytic shapes


def test_canal_area_of_a_cylinder_is_pi_r_squared_and_cord_ratio_is_its_axis_ratio():
    volume = axial_volume(np.zeros((40, 120, 120), dtype=np.float32), (1.0, 0.5, 0.5))
    p = grid_points(volume)
    centre = np.array([30.0, 30.0, 0.0])
    d = p - centre
    canal = (d[..., 0] ** 2 + d[..., 1] ** 2) <= 8.0**2
    cord = (d[..., 0] / 5.0) ** 2 + (d[..., 1] / 3.0) ** 2 <= 1.0  # LR 10 mm, AP 6 mm
    labels = np.where(cord, 2, np.where(canal, 1, 0)).astype(np.uint8)
    level = LevelFrame("C4", centre + np.array([0.0, -17.0, 20.0]), np.array([0.0, 0.0, 1.0]))
    section = canal_section(LabelMasks(labels, volume), level, canal=(1, 2), cord=2)
    assert section.canal_area_mm2 == pytest.approx(np.pi * 64, rel=0.03)
    assert section.cord_area_mm2 == pytest.approx(np.pi * 15, rel=0.06)
    assert section.cord_compression_ratio == pytest.approx(0.6, abs=0.05)


def test_canal_area_of_a_tilted_cylinder_is_measured_across_its_axis():
    volume = axial_volume(np.zeros((60, 120, 120), dtype=np.float32), (0.5, 0.5, 0.5))
    p = grid_points(volume)
    axis = np.array([0.0, np.sin(np.radians(20)), np.cos(np.radians(20))])
    centre = np.array([30.0, 30.0, 15.0])
    d = p - centre
    radial = d - (d @ axis)[..., None] * axis
    labels = (np.linalg.norm(radial, axis=-1) <= 7.0).astype(np.uint8)
    v = np.array([0.0, 1.0, 0.0]) - axis * axis[1]
    level = LevelFrame("C5", centre - 17.0 * v / np.linalg.norm(v), axis)
    section = canal_section(LabelMasks(labels, volume), level, canal=(1,), cord=None)
    assert section.canal_area_mm2 == pytest.approx(np.pi * 49, rel=0.04)
    assert section.cord_area_mm2 is None


def test_disc_height_of_a_slab_is_its_thickness():
    volume = axial_volume(np.zeros((40, 60, 60), dtype=np.float32), (0.5, 0.5, 0.5))
    z = grid_points(volume)[..., 2]
    labels = ((z >= 8.0) & (z <= 13.0)).astype(np.uint8)  # 5 mm of voxel centres, 5.5 mm of voxels
    height = disc_height(
        LabelMasks(labels, volume), np.array([15.0, 15.0, 10.5]), np.array([0.0, 0.0, 1.0]), 1, np.array([1.0, 0, 0])
    )
    assert height == pytest.approx(5.5, abs=0.3)


def _rectangle(angle_deg: float, width: float = 16.0, height: float = 14.0, step: float = 0.25) -> np.ndarray:
    """Points (posterior, superior) of a body leaning forward by ``angle_deg``, drawn on a pixel grid."""
    ys, zs = np.meshgrid(np.arange(-20, 20, step), np.arange(-20, 20, step))
    t = np.radians(angle_deg)
    # body frame: endplate direction e = (cos t, sin t); axis w = (-sin t, cos t) (leans anterior, −y)
    u = ys * np.cos(t) + zs * np.sin(t)
    w = -ys * np.sin(t) + zs * np.cos(t)
    inside = (np.abs(u) <= width / 2) & (np.abs(w) <= height / 2)
    return np.column_stack([ys[inside], zs[inside]])


@pytest.mark.parametrize("angle", [-12.0, 0.0, 7.5, 20.0])
def test_endplate_tilt_of_a_rectangle_is_its_angle(angle):
    points = _rectangle(angle)
    assert endplate_tilt(points, inferior=True) == pytest.approx(angle, abs=0.6)
    assert endplate_tilt(points, inferior=False) == pytest.approx(angle, abs=0.6)


def test_cobb_angle_is_the_difference_of_the_c7_and_c2_tilts():
    assert cobb_angle(_rectangle(-5.0), _rectangle(17.0)) == pytest.approx(22.0, abs=1.0)


def _radiograph(bodies: dict[float, float], body_dark: bool = False, flat: bool = False) -> Volume:
    """A lateral radiograph (0.5 mm pixels, rows going down, columns going posterior) of bodies 16 × 14 mm centred
    at superior mm → leaning forward by deg (``bodies``), their edges blurred as a projection blurs them;
    MONOCHROME1-like when ``body_dark``."""
    from scipy import ndimage

    i, j = np.meshgrid(np.arange(640), np.arange(320), indexing="ij")  # drawn at 0.125 mm, summed into pixels
    y, z = -20.0 - 0.1875 + 0.125 * j, 40.0 + 0.1875 - 0.125 * i
    fine = np.zeros(y.shape, np.float32)
    for centre, angle in bodies.items():
        t = np.radians(angle)
        u, w = y * np.cos(t) + (z - centre) * np.sin(t), -y * np.sin(t) + (z - centre) * np.cos(t)
        fine[(np.abs(u) <= 8.0) & (np.abs(w) <= 7.0)] = 1.0
    body = fine.reshape(160, 4, 80, 4).mean(axis=(1, 3))
    pixels = np.zeros_like(body) if flat else ndimage.gaussian_filter(body, 1.0) * (-1.0 if body_dark else 1.0)
    noise = np.random.default_rng(0).normal(0.0, 0.01, pixels.shape)
    return Volume(
        voxels=(1000.0 + 500.0 * pixels + (0.0 if flat else noise))[None].astype(np.float32),
        origin=np.array([0.0, -20.0, 40.0]),
        row_direction=np.array([0.0, 1.0, 0.0]),
        column_direction=np.array([0.0, 0.0, -1.0]),
        pixel_spacing=(0.5, 0.5),
        slice_offsets=np.zeros(1),
        projection=True,
    )


def _at(points: np.ndarray, superior_mm: float) -> np.ndarray:
    return points + np.array([0.0, superior_mm])


@pytest.mark.parametrize("body_dark", [False, True])
def test_outlines_a_few_degrees_off_are_snapped_to_the_radiographs_edges(body_dark):
    image = projection_sampler(_radiograph({20.0: -3.0, -20.0: 6.0}, body_dark))
    c2, c7 = _at(_rectangle(1.0), 20.0), _at(_rectangle(10.0), -20.0)  # the model's outlines, 4° off each body
    for edge in ("inferior", "superior", "anterior", "posterior"):
        assert snapped_tilt(c7, image, edge) == pytest.approx(6.0, abs=1.0), edge
        assert snapped_tilt(c2, image, edge) == pytest.approx(-3.0, abs=1.0), edge
    assert cobb_angle(c2, c7) == pytest.approx(9.0, abs=1.0)  # as outlined: no difference to see
    assert cobb_angle(c2, c7, image) == pytest.approx(9.0, abs=1.0)
    c2, c7 = _at(_rectangle(-7.0), 20.0), _at(_rectangle(10.0), -20.0)  # off by −4° and +4°
    assert cobb_angle(c2, c7) == pytest.approx(17.0, abs=1.0)
    assert cobb_angle(c2, c7, image) == pytest.approx(9.0, abs=1.0)


def test_without_an_edge_in_the_image_the_outlines_are_measured_as_they_are():
    flat = projection_sampler(_radiograph({20.0: -3.0, -20.0: 6.0}, flat=True))
    c2, c7 = _at(_rectangle(-7.0), 20.0), _at(_rectangle(10.0), -20.0)
    assert snapped_tilt(c7, flat, "inferior") is None
    assert cobb_angle(c2, c7, flat) == cobb_angle(c2, c7) == pytest.approx(17.0, abs=1.0)
    # outlines beyond the image's edge (a model grid wider than a small radiograph): nothing to snap to either
    image = _radiograph({20.0: -3.0, -20.0: 6.0})
    beyond = projection_sampler(image, np.concatenate([_at(c2, 200.0), _at(c7, 200.0)]))
    assert cobb_angle(_at(c2, 200.0), _at(c7, 200.0), beyond) == pytest.approx(17.0, abs=1.0)


def test_endplate_tilt_ignores_stray_pixels_below_the_body():
    points = _rectangle(6.0)
    stray = np.column_stack([np.linspace(-6, -2, 30), np.full(30, -14.0)])  # a neighbour's pixels
    assert endplate_tilt(np.concatenate([points, stray]), inferior=True) == pytest.approx(6.0, abs=0.8)


def _stack(missing: int | None = None, slices: int = 150):
    """A straight synthetic spine on an axial grid: bodies 14 mm tall, discs 5 mm, C2 at the top (z 140 mm)."""
    volume = axial_volume(np.zeros((slices, 60, 60), dtype=np.float32), (1.0, 0.5, 0.5))
    z = grid_points(volume)[..., 2]
    xy = grid_points(volume)[..., :2]
    inside = np.linalg.norm(xy - 15.0, axis=-1) <= 8.0
    labels = np.zeros(volume.shape, dtype=np.uint8)
    top = 140.0
    disc_centres = []
    for i in range(7):  # bodies C2 … T1 and the discs below C2 … C7
        body_hi = top - i * 19.0
        labels[inside & (z <= body_hi) & (z > body_hi - 14.0)] = 1
        if i < 6:
            disc_hi = body_hi - 14.0
            disc_centres.append(disc_hi - 2.5)
            if i != missing:
                labels[inside & (z <= disc_hi) & (z > disc_hi - 5.0)] = 3
    return volume, labels, disc_centres


def test_levels_are_counted_from_the_uppermost_disc():
    volume, labels, discs = _stack()
    frame = frame_from_discs(labels, volume, disc=3, body=1)
    assert list(frame.discs) == list(MEASURED_LEVELS)
    for name, z in zip(MEASURED_LEVELS, discs, strict=True):
        assert frame.discs[name].centre[2] == pytest.approx(z, abs=0.6)
    assert frame.levels_of(np.array([[15.0, 15.0, discs[2] + 8.0]]))[0] == "C4"
    assert frame.levels_of(np.array([[15.0, 15.0, discs[5] - 8.0]]))[0] == "T1"


def _specks(volume: Volume, labels: np.ndarray) -> None:
    for k in range(8):  # 8 one-voxel specks above C2 (a model's stray disc voxels at the skull base), 6 discs
        labels[145 + k % 4, 10 + 4 * k, 12] = 3


def _false_disc_at_the_skull_base(volume: Volume, labels: np.ndarray) -> None:
    xy, z = grid_points(volume)[..., :2], grid_points(volume)[..., 2]
    # 2.8 disc spacings above C2-C3: two lost discs would be needed to make it one
    labels[(np.linalg.norm(xy - 15.0, axis=-1) <= 6.0) & (z > 175.0) & (z <= 179.0)] = 3


@pytest.mark.parametrize("stray", [_specks, _false_disc_at_the_skull_base])
def test_disc_labels_that_are_no_discs_are_not_counted_as_levels(stray):
    volume, labels, discs = _stack(slices=200)
    stray(volume, labels)
    frame = frame_from_discs(labels, volume, disc=3, body=1)
    assert list(frame.discs) == list(MEASURED_LEVELS)
    for name, z in zip(MEASURED_LEVELS, discs, strict=True):
        assert frame.discs[name].centre[2] == pytest.approx(z, abs=0.6)


def test_a_disc_the_segmentation_lost_is_put_back_in_the_gap():
    volume, labels, discs = _stack(missing=2)
    frame = frame_from_discs(labels, volume, disc=3, body=1)
    assert list(frame.discs) == list(MEASURED_LEVELS)
    assert not frame.discs["C4"].found
    assert frame.discs["C4"].centre[2] == pytest.approx(discs[2], abs=1.0)
    assert frame.levels_of(np.array([[15.0, 15.0, discs[4] + 8.0]]))[0] == "C6"


def test_lesion_measurements_of_a_sphere():
    volume, labels, discs = _stack()
    frame = frame_from_discs(labels, volume, disc=3, body=1)
    centre = np.array([15.0, 15.0, discs[1] - 9.5])  # in the middle of C4's body
    d = np.linalg.norm(grid_points(volume) - centre, axis=-1)
    lesions = measure_lesions(d <= 6.0, volume, frame, "1.2.3")
    assert len(lesions) == 1
    lesion = lesions[0]
    assert lesion.vertebral_level == "C4" and lesion.levels == ("C4",)
    assert lesion.volume_ml == pytest.approx(4 / 3 * np.pi * 6.0**3 / 1000, rel=0.08)
    assert lesion.max_diameter_mm == pytest.approx(12.0, abs=1.2)
    assert np.allclose(lesion.centre_mm, centre, atol=0.3)
    assert np.all(np.array(lesion.bbox_min_mm) <= centre - 5.5) and np.all(np.array(lesion.bbox_max_mm) >= centre + 5.5)


# ------------------------------------------------------------------------------------------------------
# Fusion


LABELS = ("benign", "borderline", "malignant")
PROBS = {
    Modality.CT: np.array([0.2, 0.3, 0.5]),
    Modality.MR: np.array([0.1, 0.2, 0.7]),
    Modality.XR: np.array([0.5, 0.3, 0.2]),
}


def _calibration(weights=(1.0, 1.0, 0.5)) -> Calibration:
    return Calibration(
        detection={m: DetectionCurve(-3.0, 8.0) for m in Modality},
        detection_weights=dict(zip(Modality, (1.0, 0.8, 0.3), strict=True)),
        classification_weights=dict(zip(Modality, weights, strict=True)),
    )


@pytest.mark.parametrize(
    "subset", [s for n in (1, 2, 3) for s in itertools.combinations((Modality.CT, Modality.MR, Modality.XR), n)]
)
def test_fusion_works_with_every_subset_of_modalities(subset):
    sizes = {m: 2.0 for m in subset}
    fused = assess(sizes, {m: PROBS[m] for m in subset}, LABELS, _calibration())
    assert sum(p.probability for p in fused.probabilities) == pytest.approx(1.0, abs=1e-9)
    assert fused.tumor_detected and 0.5 < fused.detection_score <= 1.0
    assert 0.0 <= fused.uncertainty <= 1.0
    if subset == (Modality.XR,):
        assert fused.label == "benign"
    if Modality.MR in subset:
        assert fused.label == "malignant"


def test_fusion_weights_follow_the_calibration():
    heavy_xr = pool(PROBS, dict(zip(Modality, (0.1, 0.1, 5.0), strict=True)))
    assert np.argmax(heavy_xr) == 0
    expected = np.exp(np.log(PROBS[Modality.CT]) + np.log(PROBS[Modality.MR]) + 0.5 * np.log(PROBS[Modality.XR]))
    assert np.allclose(pool(PROBS, _calibration().classification_weights), expected / expected.sum())


def test_more_agreeing_modalities_give_a_more_certain_answer():
    one = assess({Modality.MR: 2.0}, {Modality.MR: PROBS[Modality.MR]}, LABELS, _calibration())
    two = assess(
        {Modality.MR: 2.0, Modality.CT: 2.0},
        {Modality.MR: PROBS[Modality.MR], Modality.CT: PROBS[Modality.CT]},
        LABELS,
        _calibration(),
    )
    assert two.uncertainty < one.uncertainty


def test_detection_without_any_lesion_is_negative_and_has_no_probabilities():
    fused = assess({Modality.CT: 0.0, Modality.MR: 0.0}, {}, LABELS, _calibration())
    assert not fused.tumor_detected and fused.detection_score < 0.1
    assert fused.probabilities == () and fused.label is None


@pytest.mark.parametrize("intercept, detected", [(0.0, True), (-1e-6, False)])
def test_one_modality_and_the_fused_assessment_detect_at_the_same_threshold(intercept, detected):
    calibration = Calibration(
        detection={m: DetectionCurve(intercept, 1.0) for m in Modality},
        detection_weights={m: 1.0 for m in Modality},
        classification_weights={m: 1.0 for m in Modality},
    )
    own = modality_assessment(Modality.CT, 0.0, calibration)
    fused = assess({Modality.CT: 0.0}, {}, LABELS, calibration)
    assert own == fused
    assert own.tumor_detected is detected and own.detection_score == pytest.approx(DETECTION_THRESHOLD, abs=1e-6)


def test_calibration_round_trips_through_json(tmp_path):
    calibration = _calibration()
    calibration.save(tmp_path)
    assert Calibration.load(tmp_path) == calibration


def _record(truth: int | None, ct, mr, xr, sizes=(1.0, 1.0, 1.0)) -> dict:
    """A pipeline record (evaluation.cohort.case_record) with each modality's matched lesion's probabilities."""
    modalities = {
        m.value: {"size": size, "probabilities": p} for m, size, p in zip(Modality, sizes, (ct, mr, xr), strict=True)
    }
    tumor = None if truth is None else {"class": LABELS[truth]}
    return {"truth": {"tumor": tumor is not None, **(tumor or {"class": None})}, "modalities": modalities}


def test_classification_weights_are_fitted_on_matched_lesions_with_bootstrap_intervals(tmp_path):
    """CT's evidence is right, MR's points at a random class, the radiograph's lesion is matched in half of the
    studies and says nothing: CT gets the largest weight, every weight lies in its interval, and studies without
    a matched radiograph lesion still count."""
    from cspine.evaluation.calibrate import fit_calibration

    rng = np.random.default_rng(1)
    records = [_record(None, None, None, None, sizes=(0.0, 0.0, 0.0)) for _ in range(10)]
    for i in range(40):
        truth = i % 3
        ct = np.full(3, 0.1)
        ct[truth] = 0.8
        mr = np.full(3, 0.1)
        mr[rng.integers(3)] = 0.8
        records.append(_record(truth, ct.tolist(), mr.tolist(), [1 / 3] * 3 if i % 2 else None))
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not a model: only its hash is kept")
    calibration = fit_calibration(records, model, "test records")
    weights, intervals = calibration.classification_weights, calibration.classification_weights_ci95
    assert weights[Modality.CT] > 1.0 > weights[Modality.MR]
    assert all(intervals[m][0] <= weights[m] <= intervals[m][1] for m in Modality)
    assert calibration.fitted_on == "test records; 50 studies"
    assert "the 40 studies with a tumor" in calibration.classification_fitted_on
    assert "CT 40, MR 40, XR 20" in calibration.classification_fitted_on
    calibration.save(tmp_path)
    assert Calibration.load(tmp_path) == calibration


def test_a_calibration_that_chose_one_modality_classifies_with_the_first_of_its_order_the_study_has(tmp_path):
    """With ``classification_order`` (MR, CT) the study's probabilities are MR's when MR classified a lesion, else
    CT's, else pooled; detection is pooled all the same, and the assessment names where its probabilities came
    from."""
    calibration = dataclasses.replace(_calibration(), classification_order=(Modality.MR, Modality.CT))
    sizes = {m: 2.0 for m in Modality}
    pooled = assess(sizes, PROBS, LABELS, _calibration())
    for present, source in [
        ((Modality.CT, Modality.MR, Modality.XR), Modality.MR),
        ((Modality.CT, Modality.XR), Modality.CT),
    ]:
        chosen = assess(sizes, {m: PROBS[m] for m in present}, LABELS, calibration)
        assert [p.probability for p in chosen.probabilities] == pytest.approx(list(PROBS[source]))
        assert chosen.classified_from == (source,)
        assert chosen.detection_score == pooled.detection_score
    only_xr = assess(sizes, {Modality.XR: PROBS[Modality.XR]}, LABELS, calibration)
    assert only_xr.classified_from == (Modality.XR,)  # no modality of the order: the XR lesion pooled alone
    assert pooled.classified_from == (Modality.CT, Modality.MR, Modality.XR)
    assert modality_assessment(Modality.MR, 2.0, calibration, LABELS, PROBS[Modality.MR]).classified_from == (
        Modality.MR,
    )
    assert assess(sizes, {}, LABELS, calibration).classified_from == ()
    calibration = dataclasses.replace(calibration, classification_choice={"chosen": "single", "studies": 3})
    calibration.save(tmp_path)
    assert Calibration.load(tmp_path) == calibration


# a lesion's class evidence: the probabilities of the true class, of the next one and of the last
EVIDENCE = {
    "sure": (0.9, 0.05, 0.05),
    "unsure": (0.45, 0.275, 0.275),
    "sure wrong": (0.05, 0.9, 0.05),
    "unsure wrong": (0.35, 0.45, 0.2),
}


def _two_modality_records(ct: list[str], mr: list[str]) -> list[dict]:
    """Tumor records whose CT and MR lesions give the EVIDENCE named, study by study."""

    def evidence(truth: int, kind: str) -> list[float]:
        return [EVIDENCE[kind][(c - truth) % 3] for c in range(3)]

    return [
        _record(i % 3, evidence(i % 3, a), evidence(i % 3, b), None)
        for i, (a, b) in enumerate(zip(ct, mr, strict=True))
    ]


def test_the_calibration_chooses_one_modality_only_where_it_classifies_better_than_pooling():
    """CT right but unsure in 90 % of the studies, MR sure and wrong in 70 %: pooling follows MR, CT alone is
    better, so the order starts with CT. CT and MR sure where right and unsure where wrong, each right in the other
    half of the studies: pooling is right everywhere and is kept."""
    from cspine.evaluation.calibrate import choose_classification

    weights = {m: 1.0 for m in Modality}
    ct = ["unsure wrong" if i % 10 == 0 else "unsure" for i in range(40)]
    mr = ["sure" if i % 10 < 3 else "sure wrong" for i in range(40)]
    order, choice = choose_classification(_two_modality_records(ct, mr), weights)
    assert order == (Modality.CT, Modality.MR) and choice["chosen"] == "single"
    assert choice["single_accuracy"] == 0.9 and choice["alone"]["MR"] == {"accuracy": 0.3, "studies": 40}
    assert choice["pooled_accuracy"] < 0.5 and choice["single_gain_ci95"][0] > 0
    ct = ["sure" if i % 2 == 0 else "unsure wrong" for i in range(40)]
    mr = ["unsure wrong" if i % 2 == 0 else "sure" for i in range(40)]
    order, choice = choose_classification(_two_modality_records(ct, mr), weights)
    assert order == () and choice["chosen"] == "pooled"
    assert choice["pooled_accuracy"] == 1.0 and choice["single_accuracy"] == 0.5 and choice["studies"] == 40


def test_a_bank_s_embeddings_are_nan_where_a_modality_has_no_roi():
    """``embed_bank`` (the default support sets' embeddings): each ROI through the shipped lesion_embed with its
    modality, NaN rows where the bank has no ROI of a modality (no lesion matched there)."""
    from cspine.inference.runner import onnx_session
    from cspine.modeling.data import LesionBank, embed_bank

    rois = np.random.default_rng(3).normal(size=(3, 3, 3, 64, 64)).astype(np.float32)
    rois[0, 2] = np.nan
    rois[2, 1:] = np.nan
    model = default_repository() / "lesion_embed" / "1" / "model.onnx"
    embeddings = embed_bank(LesionBank(rois, np.zeros(3, int), np.zeros(3, int)), model)
    present = ~np.isnan(embeddings).any(axis=2)
    assert present.tolist() == [[True, True, False], [True, True, True], [True, False, False]]
    assert np.isnan(embeddings[~present]).all()
    (direct,) = onnx_session(model).run(None, {"roi": rois[1, 2:], "modality": np.eye(3, dtype=np.float32)[2:]})
    assert np.allclose(embeddings[1, 2], direct[0], atol=1e-6)
    assert np.linalg.norm(embeddings[present], axis=1) == pytest.approx(np.ones(present.sum()), abs=1e-4)


def test_normalised_entropy_is_zero_when_certain_and_one_when_uniform():
    assert normalised_entropy(np.array([1.0, 0.0, 0.0])) == pytest.approx(0.0, abs=1e-6)
    assert normalised_entropy(np.ones(4) / 4) == pytest.approx(1.0)


def _lesion(modality: Modality, levels: str, probabilities) -> Lesion:
    """A classified lesion at ``levels`` (space-separated, the first holding most of it)."""
    named = tuple(levels.split())
    assessment = assess({modality: 1.0}, {modality: np.array(probabilities)}, LABELS, _calibration())
    box = (0.0, 0.0, 0.0)
    return Lesion(named[0], named, 10.0, 0.5, None, box, box, box, f"1.2.3.{modality.value}", assessment)


def _result(modality: Modality, *lesions: Lesion, assessed: bool = True) -> ModalityResult:
    reasons = (Reason(ReasonCode.OUT_OF_DISTRIBUTION, "test"),)
    assessment = Assessment(True, 0.9) if assessed else Assessment.not_assessable(reasons)
    return ModalityResult(modality, (), list(lesions) if assessed else [], assessment)


def test_lesions_are_matched_to_the_main_lesion_by_level():
    ct = _lesion(Modality.CT, "C4 C5", PROBS[Modality.CT])
    mr_elsewhere = _lesion(Modality.MR, "C2", [0.8, 0.1, 0.1])  # MR's largest lies elsewhere: its next one matches
    mr_same = _lesion(Modality.MR, "C5", PROBS[Modality.MR])
    xr_elsewhere = _lesion(Modality.XR, "C7", PROBS[Modality.XR])
    results = {
        Modality.CT: _result(Modality.CT, ct),
        Modality.MR: _result(Modality.MR, mr_elsewhere, mr_same),
        Modality.XR: _result(Modality.XR, xr_elsewhere),
    }
    matched, notices = matched_lesions(results)
    assert matched == {Modality.CT: ct, Modality.MR: mr_same}
    assert [(n.code, n.series_instance_uid) for n in notices] == [(NoticeCode.LESION_NOT_MATCHED, "1.2.3.XR")]
    assert "C4, C5" in notices[0].message and "at C7" in notices[0].message
    probabilities = matched_probabilities(matched)
    assert set(probabilities) == {Modality.CT, Modality.MR}
    np.testing.assert_allclose(probabilities[Modality.MR], PROBS[Modality.MR])


def test_without_a_ct_lesion_the_mr_lesion_is_the_main_one_and_unassessed_modalities_take_no_part():
    mr = _lesion(Modality.MR, "C3", PROBS[Modality.MR])
    xr = _lesion(Modality.XR, "C3 C4", PROBS[Modality.XR])
    results = {
        Modality.CT: _result(Modality.CT, _lesion(Modality.CT, "C6", PROBS[Modality.CT]), assessed=False),
        Modality.MR: _result(Modality.MR, mr),
        Modality.XR: _result(Modality.XR, xr),
    }
    assert matched_lesions(results) == ({Modality.MR: mr, Modality.XR: xr}, [])
    assert matched_lesions({Modality.CT: _result(Modality.CT)}) == ({}, [])


# ------------------------------------------------------------------------------------------------------
# The study's spine measurements, each from its preferred modality

CT_OPLL = OpllMeasurement(present=True, occupying_ratio=0.3, max_thickness_mm=3.0, levels=("C3",))
SPINE_BY_MODALITY = {
    Modality.CT: ModalitySpine(
        levels={
            "C3": LevelMeasurement("C3", 150.0, disc_height_mm=5.0, canal_source=Modality.CT, disc_source=Modality.CT)
        },
        opll=CT_OPLL,
    ),
    Modality.MR: ModalitySpine(
        levels={"C3": LevelMeasurement("C3", 160.0, 70.0, 0.6, 5.5, Modality.MR, Modality.MR, Modality.MR)},
        cobb_angle_deg=12.0,
    ),
    Modality.XR: ModalitySpine(
        levels={"C3": LevelMeasurement("C3", disc_height_mm=6.0, disc_source=Modality.XR)}, cobb_angle_deg=15.0
    ),
}


@pytest.mark.parametrize(
    "subset, canal, cord, disc, cobb, opll",
    [
        ("CT MR XR", (150.0, "CT"), (70.0, 0.6, "MR"), (5.5, "MR"), (15.0, "XR"), CT_OPLL),
        ("CT XR", (150.0, "CT"), None, (5.0, "CT"), (15.0, "XR"), CT_OPLL),
        ("CT MR", (150.0, "CT"), (70.0, 0.6, "MR"), (5.5, "MR"), (12.0, "MR"), CT_OPLL),
        ("MR", (160.0, "MR"), (70.0, 0.6, "MR"), (5.5, "MR"), (12.0, "MR"), None),
        ("XR", None, None, (6.0, "XR"), (15.0, "XR"), None),
    ],
)
def test_each_spine_measurement_comes_from_its_preferred_modality(subset, canal, cord, disc, cobb, opll):
    measured = {Modality(m): SPINE_BY_MODALITY[Modality(m)] for m in subset.split()}
    spine = combine(measured)
    c3 = spine.level("C3")
    assert (c3.canal_area_mm2, c3.canal_source) == ((canal[0], Modality(canal[1])) if canal else (None, None))
    assert (c3.cord_area_mm2, c3.cord_compression_ratio, c3.cord_source) == (
        (cord[0], cord[1], Modality(cord[2])) if cord else (None, None, None)
    )
    assert (c3.disc_height_mm, c3.disc_source) == (disc[0], Modality(disc[1]))
    assert (spine.cobb_angle_deg, spine.cobb_source) == (cobb[0], Modality(cobb[1]))
    assert spine.opll == opll
    assert [level.level for level in spine.levels] == list(MEASURED_LEVELS)
    assert all(level == LevelMeasurement(level.level) for level in spine.levels if level.level != "C3")
    assert unavailable_notices(measured, spine) == []


def test_the_ct_models_opll_is_kept_only_where_the_ct_numbers_find_it():
    names = SEG_LABELS[Modality.CT]
    body, canal, opll = names.index("vertebral_body"), names.index("canal"), names.index("opll")
    labels = np.full((3, 8, 12), body, dtype=np.uint8)
    labels[:, :, 7:] = canal
    labels[:, :, 5:7] = opll  # columns 5 (next to the body) and 6 (next to the canal)
    assert opll_where_measured(labels, CT_OPLL) is labels
    for measured in (None, dataclasses.replace(CT_OPLL, present=False)):
        kept = opll_where_measured(labels, measured)
        assert (kept[:, :, 5] == body).all() and (kept[:, :, 6] == canal).all()
        assert np.array_equal(kept[labels != opll], labels[labels != opll])


def test_a_missing_cobb_angle_is_told_only_when_a_modality_that_measures_it_was_assessed():
    ct_only = {Modality.CT: SPINE_BY_MODALITY[Modality.CT]}
    assert unavailable_notices(ct_only, combine(ct_only)) == []
    no_angle = {Modality.CT: SPINE_BY_MODALITY[Modality.CT], Modality.XR: ModalitySpine()}
    spine = combine(no_angle)
    assert spine.cobb_angle_deg is None and spine.cobb_source is None
    assert [n.code for n in unavailable_notices(no_angle, spine)] == [NoticeCode.MEASUREMENT_UNAVAILABLE]


# ------------------------------------------------------------------------------------------------------
# Against the phantom's truth, on its own label maps


@pytest.fixture(scope="module")
def phantom_maps(phantom_cases):
    out = {}
    for name in ("malignant", "benign"):
        case = phantom_cases[name]
        chosen = select_series(ingest_paths([case.path / f for f in ("ct", "mr", "xr")])).chosen
        maps = {
            m: model_labels(m, case.labels[f"{m.value.lower()}_labels"], case.labels[f"{m.value.lower()}_levels"])
            for m in (Modality.CT, Modality.MR)
        }
        maps[Modality.XR] = model_labels(Modality.XR, case.labels["xr_labels"][None], case.labels["xr_levels"][None])
        out[name] = (case, chosen, maps)
    return out


@pytest.mark.parametrize("name", ["malignant", "benign"])
def test_canal_and_cord_areas_match_the_phantom_truth(phantom_maps, name):
    case, chosen, maps = phantom_maps[name]
    ct_names, mr_names = SEG_LABELS[Modality.CT], SEG_LABELS[Modality.MR]
    ct = chosen[SeriesRole.CT].volume
    mr = chosen[SeriesRole.MR_T2].volume
    ct_frame = frame_from_discs(maps[Modality.CT], ct, ct_names.index("disc"), ct_names.index("vertebral_body"))
    mr_frame = frame_from_discs(maps[Modality.MR], mr, mr_names.index("disc"), mr_names.index("vertebral_body"))
    for level in MEASURED_LEVELS:
        truth = case.truth["levels"][level]
        ct_section = canal_section(
            LabelMasks(maps[Modality.CT], ct), ct_frame.levels[level], (ct_names.index("canal"),), None
        )
        mr_section = canal_section(
            LabelMasks(maps[Modality.MR], mr),
            mr_frame.levels[level],
            (mr_names.index("csf"), mr_names.index("cord")),
            mr_names.index("cord"),
        )
        assert ct_section.canal_area_mm2 == pytest.approx(truth["canal_area_mm2"], rel=0.10), level
        assert mr_section.cord_area_mm2 == pytest.approx(truth["cord_area_mm2"], rel=0.20), level
        if level not in case.truth["tumor"]["levels"]:  # a lesion replaces body voxels and moves the centroid
            found = np.array(ct_frame.levels[level].centre)
            assert np.linalg.norm(found - truth["body_centre_mm"]) < 4.0, level


@pytest.mark.parametrize("name", ["malignant", "benign"])
def test_lesion_level_volume_and_diameter_match_the_phantom_truth(phantom_maps, name):
    case, chosen, maps = phantom_maps[name]
    names = SEG_LABELS[Modality.CT]
    ct = chosen[SeriesRole.CT].volume
    frame = frame_from_discs(maps[Modality.CT], ct, names.index("disc"), names.index("vertebral_body"))
    lesions = measure_lesions(maps[Modality.CT] == names.index("tumor"), ct, frame, "uid")
    truth = case.truth["tumor"]
    main = lesions[0]
    assert main.vertebral_level == truth["primary_level"]
    assert sum(lesion.volume_ml for lesion in lesions) == pytest.approx(truth["volume_ml"], rel=0.15)
    assert main.max_diameter_mm == pytest.approx(truth["max_diameter_mm"], abs=2.5)


@pytest.mark.parametrize("name", ["malignant", "benign"])
def test_disc_heights_on_mr_match_the_phantom_truth(phantom_maps, name):
    case, chosen, maps = phantom_maps[name]
    names = SEG_LABELS[Modality.MR]
    mr = chosen[SeriesRole.MR_T2].volume
    frame = frame_from_discs(maps[Modality.MR], mr, names.index("disc"), names.index("vertebral_body"))
    for level in MEASURED_LEVELS:
        disc = frame.discs[level]
        across = np.cross(disc.axis, [0.0, 1.0, 0.0])
        height = disc_height(
            LabelMasks(maps[Modality.MR], mr),
            disc.centre,
            disc.axis,
            names.index("disc"),
            across / np.linalg.norm(across),
        )
        assert height == pytest.approx(case.truth["levels"][level]["disc_height_mm"], abs=1.3), level


def test_radiograph_levels_follow_the_labelled_bodies(phantom_maps):
    case, chosen, maps = phantom_maps["malignant"]
    xr = chosen[SeriesRole.XR].volume
    frame = frame_from_radiograph(maps[Modality.XR], xr)
    assert [n for n in frame.levels if n in MEASURED_LEVELS] == list(MEASURED_LEVELS)
    names = [frame.levels_of(frame.levels[n].centre[None])[0] for n in MEASURED_LEVELS]
    assert names == list(MEASURED_LEVELS)


def test_shipped_calibration_and_support_set_belong_to_the_shipped_embedding_model():
    repository = default_repository()
    data = json.loads((repository / "calibration.json").read_text())
    embed = repository / "lesion_embed" / "1" / "model.onnx"
    assert data["embed_model_sha256"] == hashlib.sha256(embed.read_bytes()).hexdigest(), "run `cspine calibrate`"
    calibration = Calibration.load(repository)
    assert set(calibration.detection) == set(Modality) and "SYNTHETIC" in calibration.fitted_on
    assert calibration != Calibration.uniform()
    support = SupportSet.load()
    assert support.synthetic and set(support.labels) == {"benign", "borderline", "malignant"}
    norms = np.linalg.norm(support.embeddings, axis=-1)  # NaN where a case has no lesion matched in a modality
    assert np.allclose(norms[~np.isnan(norms)], 1.0, atol=1e-3)  # lesion_embed is L2-normalised
    assert (~np.isnan(norms)).any(axis=1).all()  # every case has a lesion of some modality, as AddCase requires
    prototypes = PrototypeSet.from_support(support)
    assert set(prototypes.prototypes) == set(Modality)
    assert all(p.shape == (3, 64) for p in prototypes.prototypes.values())
    assert prototypes.version == PrototypeSet.from_support(SupportSet.load()).version  # deterministic


def _c2_like(angle_deg: float) -> np.ndarray:
    """A C2 on a lateral view: a 16 × 15 mm body with a 9 mm wide dens rising 15 mm from its top, leaning
    forward by ``angle_deg``; its inferior endplate ragged, as segmentations leave it near the C2–C3 disc."""
    ys, zs = np.meshgrid(np.arange(-25, 25, 0.25), np.arange(-20, 35, 0.25))
    t = np.radians(angle_deg)
    u = ys * np.cos(t) + zs * np.sin(t)
    w = -ys * np.sin(t) + zs * np.cos(t)
    body = (np.abs(u) <= 8.0) & (np.abs(w) <= 7.5)
    dens = (np.abs(u) <= 4.5) & (w > 7.5) & (w <= 22.5)
    ragged = (np.abs(u) <= 8.0) & (w < -7.5) & (w > -9.5) & (np.sin(u * 1.7) > 0.3)
    inside = body | dens | ragged
    return np.column_stack([ys[inside], zs[inside]])


@pytest.mark.parametrize("angle", [-15.0, 4.0, 12.0])
def test_c2_tilt_comes_from_its_walls_below_the_dens(angle):
    assert wall_tilt(_c2_like(angle), anterior=True, height_mm=16.0) == pytest.approx(angle, abs=1.0)
    assert wall_tilt(_c2_like(angle), anterior=False, height_mm=16.0) == pytest.approx(angle, abs=1.0)
    assert cobb_angle(_c2_like(angle), _rectangle(angle + 20.0)) == pytest.approx(20.0, abs=1.5)


@pytest.mark.parametrize("name", ["malignant", "benign"])
def test_cobb_angle_on_the_phantom_radiograph_labels_matches_the_truth(phantom_maps, name):
    case, chosen, maps = phantom_maps[name]
    xr = chosen[SeriesRole.XR].volume
    names = SEG_LABELS[Modality.XR]
    points = {}
    for level in ("c2", "c7"):
        rc = np.argwhere(maps[Modality.XR][0] == names.index(f"{level}_body"))
        points[level] = xr.index_to_patient(np.column_stack([np.zeros(len(rc)), rc]))[:, 1:3]
    # 0.5 mm pixels of a projection: the phantom's own label maps agree with its truth within 4°
    assert cobb_angle(points["c2"], points["c7"]) == pytest.approx(case.truth["cobb_angle_c2_c7_deg"], abs=4.0)
