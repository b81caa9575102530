"""DICOM SEG and SR outputs on the SYNTHETIC phantom: written with highdicom, read back value for value,
referencing the source series, and clean under dciodvfy; headers that lack what a SEG needs are fixed or
give a notice, never an exception; not-assessable modalities are reported as such, with their reasons. The SR's
lesion groups lead a viewer to the lesion's mask in the SEG; UIDs are derived from what decides the content;
a study that could not be analysed gets an SR that says so."""

from __future__ import annotations

import copy
import io
import logging
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO

import cspine
import cspine.dicom.outputs as outputs_module
from cspine.dicom.ingest import ingest, ingest_paths
from cspine.dicom.outputs import (
    REASON_CODES,
    OutputUnavailableError,
    build_failure_sr,
    build_seg,
    build_sr,
    read_sr_evaluations,
    read_sr_measurements,
    write_outputs,
)
from cspine.dicom.selection import select_series
from cspine.domain import (
    MEASURED_LEVELS,
    Assessment,
    ClassProbability,
    Disclosure,
    Lesion,
    LevelMeasurement,
    Modality,
    ModalityResult,
    ModelVersion,
    NoticeCode,
    OodScore,
    OpllMeasurement,
    Reason,
    ReasonCode,
    Series,
    SeriesRole,
    SeriesUsed,
    SpineMeasurements,
    StudyAnalysis,
)
from cspine.inference.specs import SEG_LABELS
from cspine.modeling.data import model_labels
from support import dicom as b

MODALITY_ROLES = {
    Modality.CT: (SeriesRole.CT,),
    Modality.MR: (SeriesRole.MR_T2, SeriesRole.MR_T1),
    Modality.XR: (SeriesRole.XR,),
}
FOLDERS = {Modality.CT: "ct", Modality.MR: "mr", Modality.XR: "xr"}
PROTOTYPE_SET = "ps-0007"
# Fused and per-lesion assessments with values that do not round to short decimals, so a lossy write shows.
FUSED = Assessment(
    tumor_detected=True,
    detection_score=0.9137,
    probabilities=(
        ClassProbability("benign", 0.0713),
        ClassProbability("borderline", 0.2046),
        ClassProbability("malignant", 0.7241),
    ),
    uncertainty=0.6182,
)
LESION_ASSESSMENT = Assessment(
    tumor_detected=True,
    detection_score=0.88,
    probabilities=(
        ClassProbability("benign", 1 / 7),
        ClassProbability("borderline", 2 / 7),
        ClassProbability("malignant", 4 / 7),
    ),
    uncertainty=0.8,
)
NO_CORD_LEVEL = "C6"  # its cord measurements are left out, to show that None values are not written


def _labels(case, modality: Modality) -> np.ndarray:
    key = FOLDERS[modality]
    structure, levels = case.labels[f"{key}_labels"], case.labels[f"{key}_levels"]
    if modality is Modality.XR:
        structure, levels = structure[None], levels[None]
    return model_labels(modality, structure, levels)


def _lesion(truth: dict, modality: Modality, series_uid: str) -> Lesion:
    tumor = truth["tumor"]
    centre = np.array(tumor["centre_mm"])
    projection = modality is Modality.XR
    return Lesion(
        vertebral_level=tumor["primary_level"],
        levels=tuple(tumor["levels"]),
        max_diameter_mm=tumor["max_diameter_mm"],
        volume_ml=None if projection else tumor["volume_ml"],
        area_mm2=412.5 if projection else None,
        centre_mm=tuple(centre),
        bbox_min_mm=tuple(centre - 8.0),
        bbox_max_mm=tuple(centre + 8.0),
        series_instance_uid=series_uid,
        assessment=LESION_ASSESSMENT,
    )


def _spine(truth: dict, modalities: tuple[Modality, ...]) -> SpineMeasurements:
    if Modality.CT not in modalities:
        return SpineMeasurements(cobb_angle_deg=truth["cobb_angle_c2_c7_deg"], cobb_source=Modality.XR)
    levels = []
    for name in MEASURED_LEVELS:
        values = truth["levels"][name]
        cord = name != NO_CORD_LEVEL
        levels.append(
            LevelMeasurement(
                level=name,
                canal_area_mm2=values["canal_area_mm2"],
                cord_area_mm2=values["cord_area_mm2"] if cord else None,
                cord_compression_ratio=values["cord_compression_ratio"] if cord else None,
                disc_height_mm=values["disc_height_mm"],
                canal_source=Modality.CT,
                cord_source=Modality.MR if cord else None,
                disc_source=Modality.MR,
            )
        )
    opll = truth["opll"]
    return SpineMeasurements(
        levels=levels,
        cobb_angle_deg=truth["cobb_angle_c2_c7_deg"],
        cobb_source=Modality.XR,
        opll=OpllMeasurement(opll["present"], opll["occupying_ratio"], opll["max_thickness_mm"], tuple(opll["levels"])),
    )


def _analysis(case, modalities: tuple[Modality, ...], with_labels: bool = True, root: Path | None = None):
    """A hand-made StudyAnalysis of the case from its truth (no pipeline), and the chosen series; the DICOM
    files are read from ``root`` (an edited copy of the case) when given."""
    study = ingest_paths([(root or case.path) / FOLDERS[m] for m in modalities])
    chosen = select_series(study).chosen
    results = []
    for modality in modalities:
        roles = MODALITY_ROLES[modality]
        used = tuple(
            SeriesUsed(r, chosen[r].series_instance_uid, chosen[r].description, len(chosen[r].instances)) for r in roles
        )
        labels = {r: _labels(case, modality) for r in roles} if with_labels else {}
        lesions = [_lesion(case.truth, modality, chosen[roles[0]].series_instance_uid)] if case.truth["tumor"] else []
        results.append(ModalityResult(modality, used, lesions, FUSED, labels))
    analysis = StudyAnalysis(
        study_instance_uid=study.study_instance_uid,
        modalities=results,
        fused=FUSED,
        spine=_spine(case.truth, modalities),
        prototype_set_version=PROTOTYPE_SET,
        models=[ModelVersion("seg_ct", "3"), ModelVersion("lesion_embed", "2")],
    )
    return analysis, chosen


@pytest.fixture(scope="module")
def full(phantom_cases):
    """CT + MR + XR analysis of the malignant case, with its SEG and SR."""
    analysis, chosen = _analysis(phantom_cases["malignant"], (Modality.CT, Modality.MR, Modality.XR))
    seg = build_seg(analysis, chosen)
    return analysis, chosen, seg, build_sr(analysis, chosen, seg)


@pytest.fixture(scope="module")
def xr_only(phantom_cases):
    """A radiograph-only analysis of the malignant case: the SEG is on the radiograph."""
    analysis, chosen = _analysis(phantom_cases["malignant"], (Modality.XR,))
    seg = build_seg(analysis, chosen)
    return analysis, chosen, seg, build_sr(analysis, chosen, seg)


def _segments(seg: hd.seg.Segmentation) -> dict[str, int]:
    return {item.SegmentLabel: int(item.SegmentNumber) for item in seg.SegmentSequence}


def _segment_mask(seg: hd.seg.Segmentation, sop_uids: list[str], number: int) -> np.ndarray:
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=sop_uids, segment_numbers=[number])
    return pixels[..., 0].astype(bool)


# --------------------------------------------------------------------------------------------------------
# SEG


def test_seg_round_trip_keeps_the_tumor_mask_on_the_source_ct_slices(full, phantom_cases):
    analysis, chosen, data, _ = full
    seg = hd.seg.segread(DicomBytesIO(data))
    ct = chosen[SeriesRole.CT]
    sop_uids = [ref.sop_instance_uid for ref in ct.instances]
    labels = analysis.modality(Modality.CT).labels[SeriesRole.CT]
    tumor = labels == SEG_LABELS[Modality.CT].index("tumor")
    assert tumor.any()

    segments = _segments(seg)
    assert "Tumor" in segments
    assert np.array_equal(_segment_mask(seg, sop_uids, segments["Tumor"]), tumor)
    canal = labels == SEG_LABELS[Modality.CT].index("canal")
    assert np.array_equal(_segment_mask(seg, sop_uids, segments["Spinal canal"]), canal)

    [referenced] = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == ct.series_instance_uid
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == set(sop_uids)
    assert seg.StudyInstanceUID == phantom_cases["malignant"].truth["study_instance_uid"]
    assert seg.FrameOfReferenceUID == ct.frame_of_reference_uid
    assert seg.SeriesInstanceUID != ct.series_instance_uid


def test_seg_has_one_coded_segment_per_structure_present(full):
    analysis, _, data, _ = full
    seg = hd.seg.segread(DicomBytesIO(data))
    labels = analysis.modality(Modality.CT).labels[SeriesRole.CT]
    assert len(seg.SegmentSequence) == len(np.unique(labels)) - 1  # background is no segment
    by_label = {item.SegmentLabel: item for item in seg.SegmentSequence}
    tumor = by_label["Tumor"]
    assert tumor.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"  # SCT Neoplasm
    assert tumor.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"  # morphologically abnormal
    assert by_label["Spinal canal"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "61853006"
    assert tumor.SegmentAlgorithmType == "AUTOMATIC"
    [algorithm] = tumor.SegmentationAlgorithmIdentificationSequence
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("cspine", cspine.__version__)
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    assert seg.SegmentationType == "BINARY"
    assert (seg.Manufacturer, seg.SeriesNumber, seg.InstanceNumber) == ("cspine", 901, 1)
    assert seg.SeriesDescription.startswith("cspine")


def test_seg_of_a_radiograph_holds_c2_to_c7_bodies_and_the_tumor(xr_only):
    analysis, chosen, data, _ = xr_only
    seg = hd.seg.segread(DicomBytesIO(data))
    xr = chosen[SeriesRole.XR]
    sop_uids = [ref.sop_instance_uid for ref in xr.instances]
    labels = analysis.modality(Modality.XR).labels[SeriesRole.XR]
    segments = _segments(seg)
    assert {f"C{n} vertebral body" for n in range(2, 8)} <= set(segments)
    tumor = labels == SEG_LABELS[Modality.XR].index("tumor")
    assert np.array_equal(_segment_mask(seg, sop_uids, segments["Tumor"]), tumor)
    c4 = labels == SEG_LABELS[Modality.XR].index("c4_body")
    assert np.array_equal(_segment_mask(seg, sop_uids, segments["C4 vertebral body"]), c4)
    [referenced] = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == xr.series_instance_uid


def test_seg_falls_back_to_the_mr_t2_series_when_ct_has_no_labels(phantom_cases):
    analysis, chosen = _analysis(phantom_cases["benign"], (Modality.CT, Modality.MR))
    analysis.modality(Modality.CT).labels.clear()
    seg = hd.seg.segread(DicomBytesIO(build_seg(analysis, chosen)))
    [referenced] = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == chosen[SeriesRole.MR_T2].series_instance_uid
    assert "Spinal cord" in _segments(seg) and "CSF" in _segments(seg)


def test_seg_of_an_enhanced_multi_frame_ct_puts_each_slice_on_its_source_frame():
    built = b.enhanced_series(5, frame_order=[3, 0, 4, 1, 2], rows=8, cols=8)
    chosen = select_series(ingest(built.files)).chosen
    ct = chosen[SeriesRole.CT]
    tumor = SEG_LABELS[Modality.CT].index("tumor")
    labels = np.zeros((5, 8, 8), dtype=np.uint8)
    labels[1, 2:4, 2:5] = tumor  # slice 1 only: frame 4 of the file (frame_order[3] == 1)
    labels[3, 5, 5] = tumor
    result = ModalityResult(Modality.CT, (), [], FUSED, {SeriesRole.CT: labels})
    analysis = StudyAnalysis(ct.headers[0].StudyInstanceUID, [result], FUSED, SpineMeasurements(), "", [])
    seg = hd.seg.segread(DicomBytesIO(build_seg(analysis, chosen)))

    [header] = ct.headers
    frames = seg.get_pixels_by_source_frame(
        header.SOPInstanceUID, source_frame_numbers=[1, 2, 3, 4, 5], assert_missing_frames_are_empty=True
    )[..., 0]
    expected = np.stack([labels[k] == tumor for k in built.extra["frame_order"]])
    assert np.array_equal(frames.astype(bool), expected)


def test_build_seg_returns_none_when_no_modality_has_labels(phantom_cases):
    analysis, chosen = _analysis(phantom_cases["none"], (Modality.XR,), with_labels=False)
    assert build_seg(analysis, chosen) is None
    analysis.modality(Modality.XR).labels[SeriesRole.XR] = np.zeros((1, 4, 4), dtype=np.uint8)
    assert build_seg(analysis, chosen) is None


# --------------------------------------------------------------------------------------------------------
# SR


def test_sr_round_trip_gives_back_every_lesion_and_assessment_value(full, phantom_cases):
    analysis, _, _, data = full
    truth = phantom_cases["malignant"].truth
    groups = read_sr_measurements(data)

    for modality in (Modality.CT, Modality.MR, Modality.XR):
        lesion = groups[f"{modality.value} lesion 1"]
        assert lesion["Finding"] == "Neoplasm"
        assert lesion["Finding site"] == f"{truth['tumor']['primary_level']} vertebra"
        assert lesion["Diameter"] == truth["tumor"]["max_diameter_mm"]
        assert lesion["Tumor detection score"] == LESION_ASSESSMENT.detection_score
        for p in LESION_ASSESSMENT.probabilities:
            assert lesion[f"Probability of {p.label}"] == p.probability  # exact: 1/7 survives the DS encoding
    assert groups["CT lesion 1"]["Volume"] == truth["tumor"]["volume_ml"]
    assert groups["XR lesion 1"]["Area"] == 412.5
    assert "Volume" not in groups["XR lesion 1"] and "Area" not in groups["CT lesion 1"]

    fused = groups["Fused assessment"]
    assert fused["Presence of property"] == "Present"
    assert fused["Tumor detection score"] == FUSED.detection_score
    assert fused["Classification uncertainty (normalised entropy)"] == FUSED.uncertainty
    assert {k: v for k, v in fused.items() if k.startswith("Probability of ")} == {
        f"Probability of {p.label}": p.probability for p in FUSED.probabilities
    }
    assert f"prototype set version {PROTOTYPE_SET}" in fused["Algorithm Parameters"]


def test_sr_round_trip_gives_back_the_spine_measurements_and_leaves_out_missing_ones(full, phantom_cases):
    _, _, _, data = full
    truth = phantom_cases["malignant"].truth
    groups = read_sr_measurements(data)

    for level in MEASURED_LEVELS:
        values = truth["levels"][level]
        canal = groups[f"{level} spinal canal"]
        assert canal["Area"] == values["canal_area_mm2"]
        assert canal["Finding site"] == f"{level} vertebra"
        assert canal["Modality"] == "Computed Tomography"
        disc = groups[f"{values['disc']} disc"]
        assert disc["Height"] == values["disc_height_mm"]
        if level != NO_CORD_LEVEL:
            cord = groups[f"{level} spinal cord"]
            assert cord["Area"] == values["cord_area_mm2"]
            assert cord["Cord compression ratio (AP / LR diameter)"] == values["cord_compression_ratio"]
    assert f"{NO_CORD_LEVEL} spinal cord" not in groups

    cobb = groups["Cobb angle C2-C7 (lordosis positive)"]
    assert cobb["Cobb angle"] == truth["cobb_angle_c2_c7_deg"]
    assert cobb["Modality"] == "Digital Radiography"
    opll = groups["OPLL"]
    assert opll["Presence of property"] == ("Present" if truth["opll"]["present"] else "Absent")
    assert opll["OPLL occupying ratio"] == truth["opll"]["occupying_ratio"]
    assert opll["Finding site"] == ", ".join(f"{level} vertebra" for level in truth["opll"]["levels"])


def test_sr_evidence_references_every_used_series_and_the_seg(full):
    analysis, chosen, seg_data, data = full
    sr = hd.sr.srread(DicomBytesIO(data))
    seg = pydicom.dcmread(DicomBytesIO(seg_data), stop_before_pixels=True)
    evidence = {(series_uid, sop_uid) for _, series_uid, sop_uid, _ in sr.get_evidence()}
    for role in (SeriesRole.CT, SeriesRole.MR_T2, SeriesRole.MR_T1, SeriesRole.XR):
        series = chosen[role]
        assert {(series.series_instance_uid, ref.sop_instance_uid) for ref in series.instances} <= evidence
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) in evidence
    assert sr.StudyInstanceUID == analysis.study_instance_uid == seg.StudyInstanceUID
    assert sr.PatientID == chosen[SeriesRole.CT].headers[0].PatientID
    assert (sr.Manufacturer, sr.SeriesNumber, sr.InstanceNumber) == ("cspine", 902, 1)
    assert sr.SeriesDescription.startswith("cspine")
    # the lesion groups point at the slices through the lesion, so a viewer can go there: the CT lesion (the
    # SEG is on the CT) through the SEG's tumor segment, the MR lesion (whose mask the SEG does not hold) directly
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    [ct_lesion] = [g for g in report.get_volumetric_roi_measurement_groups() if g.tracking_identifier == "CT lesion 1"]
    ct_uids = {ref.sop_instance_uid for ref in chosen[SeriesRole.CT].instances}
    segment = ct_lesion.referenced_segment
    assert segment is not None and segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    sources = {image.referenced_sop_instance_uid for image in segment.source_images_for_segmentation}
    assert sources and sources <= ct_uids and len(sources) < len(ct_uids)
    [mr_lesion] = [g for g in report.get_image_measurement_groups() if g.tracking_identifier == "MR lesion 1"]
    mr_uids = {ref.sop_instance_uid for ref in chosen[SeriesRole.MR_T2].instances}
    sources = {image.referenced_sop_instance_uid for image in mr_lesion.source_images}
    assert sources and sources <= mr_uids and len(sources) < len(mr_uids)


def test_sr_of_a_radiograph_only_analysis_reports_its_lesion_and_cobb_angle(xr_only, phantom_cases):
    _, _, _, data = xr_only
    truth = phantom_cases["malignant"].truth
    groups = read_sr_measurements(data)
    assert set(groups) == {"XR lesion 1", "XR assessment", "Fused assessment", "Cobb angle C2-C7 (lordosis positive)"}
    assert groups["XR lesion 1"]["Diameter"] == truth["tumor"]["max_diameter_mm"]
    assert groups["Cobb angle C2-C7 (lordosis positive)"]["Cobb angle"] == truth["cobb_angle_c2_c7_deg"]


# --------------------------------------------------------------------------------------------------------
# dciodvfy


def _assert_dciodvfy_clean(data: bytes, iod: str, path: Path, allowed: tuple[str, ...] = ()) -> None:
    """dciodvfy recognises ``iod`` and reports no error, and no warning but that it does not know 99CSPINE (and
    those holding one of ``allowed``)."""
    assert shutil.which("dciodvfy"), "dciodvfy (Debian package dicom3tools) must be installed: make sysdeps"
    path.write_bytes(data)
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + "\n" + run.stderr).splitlines()
    assert iod in (line.strip() for line in lines), lines[:3]  # it recognised the IOD it checked
    errors = [line for line in lines if line.startswith("Error")]
    assert not errors, f"{path.name}: {errors}"
    # the one expected warning: dciodvfy does not know the private scheme 99CSPINE
    warnings = [
        line
        for line in lines
        if line.startswith("Warning") and not any(text in line for text in ("99CSPINE", *allowed))
    ]
    assert not warnings, f"{path.name}: {warnings}"


@pytest.mark.parametrize("outputs", ["full", "xr_only"])
def test_seg_and_sr_pass_dciodvfy_without_errors(outputs, request, tmp_path: Path):
    _, _, seg, sr = request.getfixturevalue(outputs)
    _assert_dciodvfy_clean(seg, "Segmentation", tmp_path / "seg.dcm")
    _assert_dciodvfy_clean(sr, "Comprehensive3DSR", tmp_path / "sr.dcm")


# --------------------------------------------------------------------------------------------------------
# Source headers that lack something: fixed where the SEG stays valid, else a notice — never an exception

Edit = Callable[[pydicom.Dataset], None]


def _deleting(*keywords: str) -> Edit:
    def edit(ds: pydicom.Dataset) -> None:
        for keyword in keywords:
            delattr(ds, keyword)

    return edit


def _setting(**values) -> Edit:
    def edit(ds: pydicom.Dataset) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)

    return edit


def _edited_copy(case, modality: Modality, edit: Edit, root: Path) -> Path:
    """The case's files of ``modality`` copied under ``root``, each changed by ``edit`` with pydicom."""
    folder = root / FOLDERS[modality]
    folder.mkdir(parents=True)
    for path in sorted((case.path / FOLDERS[modality]).iterdir()):
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(folder / path.name)
    return root


def _volume_on_source_slices(seg: hd.seg.Segmentation, series: Series) -> np.ndarray:
    """``seg.get_volume()`` (slices, rows, columns, segments) put in the source series' slice order, each SEG
    slice matched to the source slice at its patient position."""
    volume = seg.get_volume()
    affine, source = volume.affine, series.volume
    assert np.allclose(affine[:3, 1:3], source.affine()[:3, 1:3], atol=1e-4)  # the same rows and columns
    positions = affine[:3, 3] + np.arange(volume.spatial_shape[0])[:, None] * affine[:3, 0]
    order = [int(np.argmin(np.linalg.norm(source.slice_positions() - p, axis=1))) for p in positions]
    assert sorted(order) == list(range(len(source.slice_offsets)))
    out = np.zeros_like(volume.array)
    out[order] = volume.array
    return out


NOMINAL_FRAME = pydicom.uid.generate_uid(entropy_srcs=["cspine tests: a radiograph with a frame of reference"])
# (modality, the change to the phantom's files): every one must give a SEG that dciodvfy passes.
SEG_SOURCES: dict[str, tuple[Modality, Edit | None]] = {
    "ct": (Modality.CT, None),
    "mr": (Modality.MR, None),
    "xr": (Modality.XR, None),
    "ct-without-slice-thickness": (Modality.CT, _deleting("SliceThickness")),
    "mr-without-slice-thickness": (Modality.MR, _deleting("SliceThickness")),
    "xr-with-a-frame-of-reference": (Modality.XR, _setting(FrameOfReferenceUID=NOMINAL_FRAME)),
    "xr-with-a-nominal-plane": (
        Modality.XR,
        _setting(
            FrameOfReferenceUID=NOMINAL_FRAME,
            ImagePositionPatient=[0.0, 0.0, 0.0],
            ImageOrientationPatient=[0.0, 1.0, 0.0, 0.0, 0.0, -1.0],
        ),
    ),
    "xr-without-patient-orientation": (Modality.XR, _deleting("PatientOrientation")),
    "xr-without-patient-name": (Modality.XR, _deleting("PatientName")),  # written empty (type 2)
}


@pytest.mark.parametrize("source", SEG_SOURCES)
def test_every_seg_passes_dciodvfy_and_reads_back_its_label_map(source, phantom_cases, tmp_path: Path):
    modality, edit = SEG_SOURCES[source]
    case = phantom_cases["malignant"]
    root = _edited_copy(case, modality, edit, tmp_path / "study") if edit is not None else None
    analysis, chosen = _analysis(case, (modality,), root=root)
    role = MODALITY_ROLES[modality][0]
    series, labels = chosen[role], analysis.modality(modality).labels[role]
    data = build_seg(analysis, chosen)

    _assert_dciodvfy_clean(data, "Segmentation", tmp_path / "seg.dcm")
    seg = hd.seg.segread(DicomBytesIO(data))
    if modality is Modality.XR:
        assert "FrameOfReferenceUID" not in seg  # a projection's SEG lies on its pixel grid
        sop_uids = [ref.sop_instance_uid for ref in series.instances]
        masks = np.stack([_segment_mask(seg, sop_uids, int(s.SegmentNumber)) for s in seg.SegmentSequence], axis=-1)
    else:
        assert seg.FrameOfReferenceUID == series.frame_of_reference_uid
        masks = _volume_on_source_slices(seg, series)
    assert masks.shape[-1] == len(np.unique(labels)) - 1
    for k, item in enumerate(seg.SegmentSequence):
        assert np.array_equal(masks[..., k].astype(bool), labels == SEG_LABELS[modality].index(item.TrackingID))


def test_seg_of_a_ct_without_slice_thickness_takes_the_slice_spacing_on_a_copy(phantom_cases, tmp_path: Path):
    case = phantom_cases["benign"]
    root = _edited_copy(case, Modality.CT, _deleting("SliceThickness"), tmp_path / "study")
    analysis, chosen = _analysis(case, (Modality.CT,), root=root)
    seg = hd.seg.segread(DicomBytesIO(build_seg(analysis, chosen)))

    ct = chosen[SeriesRole.CT]
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert ct.volume.slice_spacing > 0 and float(measures.SliceThickness) == pytest.approx(ct.volume.slice_spacing)
    assert "SliceThickness" not in ct.headers[0]  # the source headers stay as they were sent


def test_a_ct_without_frame_of_reference_gets_no_seg_but_keeps_its_analysis_sr_and_a_notice(
    phantom_cases, tmp_path: Path, caplog
):
    case = phantom_cases["malignant"]
    root = _edited_copy(case, Modality.CT, _deleting("FrameOfReferenceUID"), tmp_path / "study")
    analysis, chosen = _analysis(case, (Modality.CT,), root=root)
    with pytest.raises(OutputUnavailableError, match="the CT series has no FrameOfReferenceUID"):
        build_seg(analysis, chosen)

    with caplog.at_level(logging.WARNING, logger="cspine.pipeline"):
        write_outputs(analysis, chosen, seg=True, sr=True)
    assert analysis.dicom_seg is None
    [notice] = [n for n in analysis.notices if n.code is NoticeCode.OUTPUT_UNAVAILABLE]
    assert notice.message.startswith("DICOM SEG not written: the CT series has no FrameOfReferenceUID")
    assert "OutputUnavailableError" in caplog.text
    header = chosen[SeriesRole.CT].headers[0]
    for said in (notice.message, caplog.text):
        assert str(header.PatientName) not in said and str(header.PatientID) not in said
    # the SR is still written (with no SEG to reference), valid, with the lesion
    assert read_sr_measurements(analysis.dicom_sr)["CT lesion 1"]["Finding"] == "Neoplasm"
    _assert_dciodvfy_clean(analysis.dicom_sr, "Comprehensive3DSR", tmp_path / "sr.dcm")


def test_malformed_patient_and_study_headers_leave_their_values_out_of_a_valid_seg_and_sr_with_a_notice(
    phantom_cases, tmp_path: Path, caplog
):
    case = phantom_cases["malignant"]
    root = tmp_path / "study"
    for modality in (Modality.CT, Modality.MR, Modality.XR):
        _edited_copy(case, modality, b.with_malformed_patient_study, root)
    analysis, chosen = _analysis(case, (Modality.CT, Modality.MR, Modality.XR), root=root)
    with caplog.at_level(logging.DEBUG):
        write_outputs(analysis, chosen, seg=True, sr=True)

    assert [n for n in analysis.notices if n.code is NoticeCode.OUTPUT_UNAVAILABLE] == []
    omitted = {n.message.split()[1]: n.message for n in analysis.notices if n.code is NoticeCode.OUTPUT_VALUE_OMITTED}
    assert set(omitted) == {"SEG", "SR"}
    for kind, data in (("SEG", analysis.dicom_seg), ("SR", analysis.dicom_sr)):
        assert omitted[kind].startswith(f"DICOM {kind} written without the source's PatientName, ")
        for keyword in ("PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "PatientAge"):
            assert keyword in omitted[kind]  # named by keyword ...
        assert b.PHI_MARKER not in omitted[kind]  # ... never by value
        # Every malformed patient and study attribute that reached the output is there, empty; no value is.
        written = pydicom.dcmread(DicomBytesIO(data))
        for keyword in b.MALFORMED_PATIENT_STUDY:
            assert keyword not in written or written[keyword].is_empty, (kind, keyword)
        for keyword in outputs_module.PATIENT_STUDY_ARGUMENTS:  # type 2: present, if empty
            assert keyword in written and written[keyword].is_empty
        assert b.PHI_MARKER.encode() not in data
        # dciodvfy notes only that an empty StudyDate or StudyTime could not go into a DICOMDIR
        iod = "Segmentation" if kind == "SEG" else "Comprehensive3DSR"
        _assert_dciodvfy_clean(data, iod, tmp_path / f"{kind}.dcm", allowed=("needed to build DICOMDIR",))
    assert read_sr_measurements(analysis.dicom_sr)["CT lesion 1"]["Finding"] == "Neoplasm"
    # The headers the analysis holds keep what was sent: the output's elements were replaced, not changed.
    assert b.PHI_MARKER in str(chosen[SeriesRole.CT].headers[0].PatientBirthDate)
    # cspine and highdicom logged no value, even before redaction (pydicom's complaints are redacted: test_logs_phi)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith(("cspine", "highdicom"))]
    assert any("written without the source's PatientName" in m for m in ours)
    assert not any(b.PHI_MARKER in m for m in ours)


def test_whatever_a_writer_raises_becomes_a_notice_naming_only_the_exception_type(phantom_cases, monkeypatch, caplog):
    secret = "SYNTHETIC^MALIGNANT 1.2.826.0.1.3680043.8.498.1"

    def refuse(*args, **kwargs):
        raise ValueError(f"a header value of {secret}")

    def crash(*args, **kwargs):
        raise RuntimeError(secret)

    monkeypatch.setattr(hd.seg, "Segmentation", refuse)
    monkeypatch.setattr(outputs_module, "_report", crash)
    analysis, chosen = _analysis(phantom_cases["malignant"], (Modality.XR,))
    with caplog.at_level(logging.WARNING):
        write_outputs(analysis, chosen, seg=True, sr=True)

    assert analysis.dicom_seg is None and analysis.dicom_sr is None
    assert [n.message for n in analysis.notices if n.code is NoticeCode.OUTPUT_UNAVAILABLE] == [
        "DICOM SEG not written: highdicom could not make one of the XR series (ValueError)",
        "DICOM SR not written: an internal error (RuntimeError)",
    ]
    assert "ValueError" in caplog.text and "RuntimeError" in caplog.text and secret not in caplog.text


def test_seg_leaves_out_a_not_assessable_modality_and_no_assessed_one_gives_a_notice(phantom_cases):
    analysis, chosen = _analysis(phantom_cases["benign"], (Modality.CT, Modality.MR))
    analysis.modality(Modality.CT).assessment = NOT_ASSESSABLE  # its label map is still there
    seg = hd.seg.segread(DicomBytesIO(build_seg(analysis, chosen)))
    [referenced] = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == chosen[SeriesRole.MR_T2].series_instance_uid

    analysis.modality(Modality.MR).assessment = NOT_ASSESSABLE
    assert build_seg(analysis, chosen) is None
    write_outputs(analysis, chosen, seg=True, sr=False)
    assert analysis.dicom_seg is None
    assert [n.message for n in analysis.notices if n.code is NoticeCode.OUTPUT_UNAVAILABLE] == [
        "DICOM SEG not written: no assessed modality has a segmented structure"
    ]


# --------------------------------------------------------------------------------------------------------
# SR: not assessable, its reasons, the disclosure

OOD_REASON = Reason(
    ReasonCode.OUT_OF_DISTRIBUTION,
    "the CT's seg_ct features lie far outside its training data (score 41.2, threshold 30.0)",  # > 64 characters
)
COVERAGE_REASON = Reason(ReasonCode.INSUFFICIENT_COVERAGE, "the CT covers C4–C6, not C2–C7")  # not Latin-1
NOT_ASSESSABLE = Assessment.not_assessable((OOD_REASON, COVERAGE_REASON))
DISCLOSURE = Disclosure("SYNTHETIC phantom data only", "Research use only; not for clinical use.")


@pytest.fixture(scope="module")
def ct_not_assessable(phantom_cases):
    """CT not assessable (with a lesion and labels left in, which the writers must leave out), MR assessed,
    a disclosure; its SEG and SR."""
    analysis, chosen = _analysis(phantom_cases["malignant"], (Modality.CT, Modality.MR))
    ct = analysis.modality(Modality.CT)
    ct.assessment, ct.ood = NOT_ASSESSABLE, OodScore(41.2, 30.0)
    analysis.modality(Modality.MR).ood = OodScore(3.5, 30.0)
    analysis.disclosure = DISCLOSURE
    seg = build_seg(analysis, chosen)
    return analysis, chosen, seg, build_sr(analysis, chosen, seg)


def test_sr_reports_a_not_assessable_modality_with_its_reasons_and_no_finding_or_score(ct_not_assessable):
    _, _, _, data = ct_not_assessable
    groups = read_sr_measurements(data)

    ct = groups["CT assessment"]
    assert ct["Assessability"] == "Not assessable"
    assert ct["Reasons"] == (
        ("out_of_distribution", "Out of distribution", OOD_REASON.message),
        ("insufficient_coverage", "Insufficient coverage", COVERAGE_REASON.message),
    )
    assert ct["Out-of-distribution score (Mahalanobis distance)"] == 41.2
    assert ct["Out-of-distribution threshold"] == 30.0
    for absent in ("Finding", "Presence of property", "Tumor detection score", "Finding category"):
        assert absent not in ct
    assert not [name for name in ct if name.startswith("Probability of")]
    assert "CT lesion 1" not in groups and groups["MR lesion 1"]["Finding"] == "Neoplasm"

    mr = groups["MR assessment"]
    assert (mr["Assessability"], mr["Finding"], mr["Presence of property"]) == ("Assessed", "Neoplasm", "Present")
    assert mr["Tumor detection score"] == FUSED.detection_score and "Reasons" not in mr
    assert mr["Out-of-distribution score (Mahalanobis distance)"] == 3.5
    assert groups["Fused assessment"]["Assessability"] == "Assessed"


def test_sr_states_the_disclosure_and_the_model_versions(ct_not_assessable):
    _, _, _, data = ct_not_assessable
    assert read_sr_evaluations(data) == {"Model training data and intended use": DISCLOSURE.text}
    for group in ("CT assessment", "MR assessment", "Fused assessment"):
        parameters = read_sr_measurements(data)[group]["Algorithm Parameters"]
        assert {"model seg_ct version 3", "model lesion_embed version 2"} <= set(parameters)


def test_sr_and_seg_with_a_not_assessable_modality_pass_dciodvfy(ct_not_assessable, tmp_path: Path):
    _, chosen, seg, sr = ct_not_assessable
    [referenced] = pydicom.dcmread(DicomBytesIO(seg)).ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == chosen[SeriesRole.MR_T2].series_instance_uid  # not the CT
    _assert_dciodvfy_clean(seg, "Segmentation", tmp_path / "seg.dcm")
    _assert_dciodvfy_clean(sr, "Comprehensive3DSR", tmp_path / "sr.dcm")


def test_sr_of_a_study_nothing_could_assess_has_a_not_assessable_fused_assessment(phantom_cases, tmp_path: Path):
    analysis, chosen = _analysis(phantom_cases["none"], (Modality.XR,))
    xr = analysis.modality(Modality.XR)
    xr.assessment = Assessment.not_assessable((Reason(ReasonCode.NO_VERTEBRAL_COLUMN, "no vertebral column"),))
    xr.labels.clear()  # a not-assessable modality may keep no label map at all
    study_reason = Reason(ReasonCode.NO_ASSESSABLE_MODALITY, "no modality could be assessed (XR: no_vertebral_column)")
    analysis.fused = Assessment.not_assessable((study_reason,))
    write_outputs(analysis, chosen, seg=True, sr=True)

    assert analysis.dicom_seg is None
    groups = read_sr_measurements(analysis.dicom_sr)
    fused = groups["Fused assessment"]
    assert fused["Assessability"] == "Not assessable"
    assert fused["Reasons"] == (("no_assessable_modality", "No assessable modality", study_reason.message),)
    [xr_reason] = groups["XR assessment"]["Reasons"]
    assert xr_reason == ("no_vertebral_column", "No vertebral column", "no vertebral column")
    assert not [name for name, group in groups.items() if group.get("Finding") == "Neoplasm"]
    assert not [name for group in groups.values() for name in group if name.startswith(("Probability", "Tumor"))]
    _assert_dciodvfy_clean(analysis.dicom_sr, "Comprehensive3DSR", tmp_path / "sr.dcm")


def test_every_reason_code_has_a_private_code_whose_meaning_fits_64_characters():
    assert set(REASON_CODES) == set(ReasonCode)
    for reason, code in REASON_CODES.items():
        assert (code.value, code.scheme_designator) == (reason.value, "99CSPINE")
        assert 0 < len(code.meaning) <= 64


# --------------------------------------------------------------------------------------------------------
# IHE AI Results: a viewer follows each lesion group of the SR to the lesion's mask in the SEG


def _seg_reference(group) -> tuple[str, int | None, list[int], list[str]]:
    """(SEG SOP Instance UID, segment number or None, SEG frame numbers, source SOP Instance UIDs) of a TID 1411
    or TID 1410 group's reference, read as a viewer reads it (highdicom's SR API)."""
    if isinstance(group, hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations):
        segment = group.referenced_segment
        sources = [image.referenced_sop_instance_uid for image in segment.source_images_for_segmentation]
        [number] = segment.referenced_segment_numbers
        return segment.referenced_sop_instance_uid, number, segment.referenced_frame_numbers or [], sources
    frame = group.referenced_segmentation_frame
    source = frame.source_image_for_segmentation.referenced_sop_instance_uid
    return frame.referenced_sop_instance_uid, None, frame.referenced_frame_numbers, [source]


# (fixture, the lesion groups that reference the SEG: those of the SEG's series)
REFERENCING = {"full": {"CT lesion 1"}, "xr_only": {"XR lesion 1"}, "ct_not_assessable": {"MR lesion 1"}}


@pytest.mark.parametrize("outputs", REFERENCING)
def test_a_viewer_following_the_sr_lesion_references_finds_the_lesion_mask_in_the_seg(outputs, request, phantom_cases):
    analysis, chosen, seg_data, sr_data = request.getfixturevalue(outputs)
    pacs = {pydicom.dcmread(DicomBytesIO(data)).SOPInstanceUID: data for data in (seg_data, sr_data)}
    sr = hd.sr.srread(DicomBytesIO(sr_data))
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    groups = [*report.get_volumetric_roi_measurement_groups(), *report.get_planar_roi_measurement_groups()]
    assert {g.tracking_identifier for g in groups} == REFERENCING[outputs]
    lesions = {
        f"{r.modality.value} lesion {n}": (r, lesion)
        for r in analysis.modalities
        for n, lesion in enumerate(r.lesions, start=1)
    }

    for group in groups:
        result, lesion = lesions[group.tracking_identifier]
        seg_uid, number, frames, sources = _seg_reference(group)
        seg = hd.seg.segread(DicomBytesIO(pacs[seg_uid]))  # the SEG the reference names is the one sent with it
        numbers = {int(item.SegmentNumber) for item in seg.SegmentSequence}
        if number is None:  # TID 1410: the referenced frame names its segment
            [number] = {
                int(
                    seg.PerFrameFunctionalGroupsSequence[f - 1].SegmentIdentificationSequence[0].ReferencedSegmentNumber
                )
                for f in frames
            }
        assert number in numbers
        [item] = [item for item in seg.SegmentSequence if int(item.SegmentNumber) == number]
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Neoplasm"
        mask = _segment_mask(seg, sources, number)
        assert mask.any()  # the mask is not empty on the lesion's slices
        role = next(role for role, series in chosen.items() if series.series_instance_uid == lesion.series_instance_uid)
        series = chosen[role]
        assert set(sources) <= {ref.sop_instance_uid for ref in series.instances}
        if result.modality is Modality.XR:  # a projection: the mask on the radiograph is the tumor label map
            tumor = result.labels[role] == SEG_LABELS[Modality.XR].index("tumor")
            assert np.array_equal(mask, tumor)
            continue
        # the lesion's centre, placed with the SEG's own geometry, lies in the referenced segment
        volume = seg.get_volume(segment_numbers=[number])
        k, i, j = np.rint(np.linalg.inv(volume.affine) @ np.array([*lesion.centre_mm, 1.0]))[:3].astype(int)
        assert volume.array[k, i, j, 0], (group.tracking_identifier, (k, i, j))


def test_sr_without_a_seg_keeps_image_level_lesion_groups(full):
    analysis, chosen, _, _ = full
    report = hd.sr.MeasurementReport.from_sequence(hd.sr.srread(DicomBytesIO(build_sr(analysis, chosen))).content)
    assert report.get_volumetric_roi_measurement_groups() == [] and report.get_planar_roi_measurement_groups() == []
    lesions = {
        g.tracking_identifier: g for g in report.get_image_measurement_groups() if "lesion" in g.tracking_identifier
    }
    assert set(lesions) == {"CT lesion 1", "MR lesion 1", "XR lesion 1"}
    assert all(group.source_images for group in lesions.values())


# --------------------------------------------------------------------------------------------------------
# Deterministic UIDs: the same analysis sent twice is the same SEG and SR; other inputs, other UIDs


def _uids(data: bytes) -> tuple[str, str]:
    ds = pydicom.dcmread(DicomBytesIO(data), stop_before_pixels=True)
    return ds.SeriesInstanceUID, ds.SOPInstanceUID


def _tracking_uids(seg: bytes, sr: bytes) -> list[str]:
    segments = [item.TrackingUID for item in pydicom.dcmread(DicomBytesIO(seg)).SegmentSequence]
    report = hd.sr.MeasurementReport.from_sequence(hd.sr.srread(DicomBytesIO(sr)).content)
    groups = [
        *report.get_image_measurement_groups(),
        *report.get_planar_roi_measurement_groups(),
        *report.get_volumetric_roi_measurement_groups(),
    ]
    return segments + [group.tracking_uid for group in groups]


def test_seg_and_sr_uids_are_derived_from_what_decides_their_content(phantom_cases, tmp_path: Path):
    case = phantom_cases["malignant"]
    analysis, chosen = _analysis(case, (Modality.XR,))
    seg = build_seg(analysis, chosen)
    sr = build_sr(analysis, chosen, seg)

    # analysed again (a new analysis object, the series ingested again): the same UIDs, down to the tracking UIDs
    again, chosen_again = _analysis(case, (Modality.XR,))
    seg_again = build_seg(again, chosen_again)
    sr_again = build_sr(again, chosen_again, seg_again)
    assert (_uids(seg_again), _uids(sr_again)) == (_uids(seg), _uids(sr))
    assert _tracking_uids(seg_again, sr_again) == _tracking_uids(seg, sr)
    uids = [*_uids(seg), *_uids(sr)]
    assert len(set(uids)) == 4 and all(pydicom.uid.UID(uid).is_valid for uid in uids)
    assert _uids(build_sr(analysis, chosen)) != _uids(sr)  # the SR without a SEG is another document

    # another prototype set version, another model version, another source series: other UIDs
    others = {}
    prototypes = copy.copy(analysis)
    prototypes.prototype_set_version = "ps-0008"
    others["prototype set"] = (prototypes, chosen)
    models = copy.copy(analysis)
    models.models = [ModelVersion("seg_ct", "4"), ModelVersion("lesion_embed", "2")]
    others["model version"] = (models, chosen)
    new_series = pydicom.uid.generate_uid(entropy_srcs=["cspine tests: another radiograph series"])
    root = _edited_copy(case, Modality.XR, _setting(SeriesInstanceUID=new_series), tmp_path / "study")
    others["source series"] = _analysis(case, (Modality.XR,), root=root)
    assert others["source series"][0].study_instance_uid == analysis.study_instance_uid
    for name, (other, other_chosen) in others.items():
        other_seg = build_seg(other, other_chosen)
        other_sr = build_sr(other, other_chosen, other_seg)
        assert not set(uids) & {*_uids(other_seg), *_uids(other_sr)}, name


# --------------------------------------------------------------------------------------------------------
# The SR of a study cspine could not analyse

FAILURE = "no modality of the study could be analysed: CT could not be analysed: the series covers C4–C6 only"


def _source_header(case, edit: Edit | None = None) -> pydicom.Dataset:
    """The header of the case's first CT file as the DICOM node reads it (after ``edit``, written and read back)."""
    ds = pydicom.dcmread(sorted((case.path / "ct").iterdir())[0])
    if edit is not None:
        edit(ds)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()), stop_before_pixels=True)


def _content_tree(items) -> list[tuple[str, str, str]]:
    """(value type, concept name meaning, value) of every content item under ``items``, depth first."""
    out = []
    for item in items:
        value = ""
        if item.ValueType == "TEXT":
            value = str(item.TextValue)
        elif item.ValueType == "CODE":
            value = item.ConceptCodeSequence[0].CodeMeaning
        elif item.ValueType == "UIDREF":
            value = str(item.UID)
        out.append((item.ValueType, item.ConceptNameCodeSequence[0].CodeMeaning, value))
        out += _content_tree(item.get("ContentSequence", []))
    return out


def test_failure_sr_says_the_study_was_not_analysed_and_why(phantom_cases, full, tmp_path: Path):
    source = _source_header(phantom_cases["malignant"])
    data = build_failure_sr(source, FAILURE)

    _assert_dciodvfy_clean(data, "Comprehensive3DSR", tmp_path / "failure.dcm")
    sr = pydicom.dcmread(DicomBytesIO(data))
    assert sr.SOPClassUID == pydicom.dcmread(DicomBytesIO(full[3])).SOPClassUID  # the report's SOP class
    assert (sr.StudyInstanceUID, sr.PatientID, sr.PatientName) == (
        source.StudyInstanceUID,
        source.PatientID,
        source.PatientName,
    )
    assert (sr.Modality, sr.Manufacturer, sr.CompletionFlag) == ("SR", "cspine", "COMPLETE")
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    title = sr.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "NOT-ANALYSED",
        "99CSPINE",
        "Study not analysed by cspine",
    )
    tree = _content_tree(sr.ContentSequence)
    assert ("TEXT", "Reason not analysed", FAILURE) in tree  # the message, non-ASCII dash included
    assert ("CODE", "Observer Type", "Device") in tree and ("TEXT", "Device Observer Name", "cspine") in tree
    assert ("TEXT", "Algorithm Name", "cspine") in tree and ("TEXT", "Algorithm Version", cspine.__version__) in tree
    [evidence] = hd.sr.srread(DicomBytesIO(data)).get_evidence()
    assert evidence[2] == source.SOPInstanceUID  # the instance it was built on, nothing else
    assert set(read_sr_measurements(data)) == {"cspine analysis"}  # a TID 1500 report highdicom reads back

    # deterministic: the same failure of the same study is the same instance; another message another one
    assert _uids(build_failure_sr(source, FAILURE)) == _uids(data)
    other = _uids(build_failure_sr(source, "the analysis failed inside cspine; the service log has the details"))
    assert not set(other) & set(_uids(data))
    other_study = _source_header(phantom_cases["benign"])
    assert not set(_uids(build_failure_sr(other_study, FAILURE))) & set(_uids(data))


FAILURE_SOURCES: dict[str, Edit] = {
    "missing": _deleting("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime"),
    "malformed": b.with_malformed_patient_study,
}


@pytest.mark.parametrize("header", FAILURE_SOURCES)
def test_failure_sr_of_a_header_missing_or_malformed_values_leaves_them_empty_and_passes_dciodvfy(
    header, phantom_cases, tmp_path: Path
):
    source = _source_header(phantom_cases["malignant"], FAILURE_SOURCES[header])
    data = build_failure_sr(source, FAILURE)

    _assert_dciodvfy_clean(data, "Comprehensive3DSR", tmp_path / "failure.dcm", allowed=("needed to build DICOMDIR",))
    sr = pydicom.dcmread(DicomBytesIO(data))
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    for keyword in outputs_module.PATIENT_STUDY_ARGUMENTS[:4]:  # patient name, ID, birth date, sex: empty
        assert keyword in sr and sr[keyword].is_empty
    assert b.PHI_MARKER.encode() not in data
    assert ("TEXT", "Reason not analysed", FAILURE) in _content_tree(sr.ContentSequence)


def test_failure_sr_of_a_header_without_valid_uids_is_refused_naming_the_attribute_only(phantom_cases):
    case = phantom_cases["malignant"]
    for keyword, edit in (
        ("StudyInstanceUID", _deleting("StudyInstanceUID")),
        ("SeriesInstanceUID", _setting(SeriesInstanceUID=f"{b.PHI_MARKER}.1.2")),
    ):
        source = _source_header(case, edit)
        with pytest.raises(OutputUnavailableError, match=f"no valid {keyword}$") as refused:
            build_failure_sr(source, FAILURE)
        assert b.PHI_MARKER not in str(refused.value)
