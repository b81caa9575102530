"""Series selection: the right series fills each role, and every other series is told why it was skipped."""

from __future__ import annotations

import pytest
from pydicom import uid as dicom_uid

from cspine.dicom.ingest import ingest
from cspine.dicom.selection import (
    MrWeighting,
    RadiographView,
    mr_weighting,
    radiograph_view,
    select_series,
)
from cspine.domain import NoticeCode, Series, SeriesRole
from support import dicom as b


def study_of(*builts, extra=()):
    files = [f for built in builts for f in built.files] + list(extra)
    return ingest(files)


def skipped(selection):
    return {n.series_instance_uid: n.message for n in selection.notices if n.code is NoticeCode.SERIES_SKIPPED}


def missing(selection):
    return [n.message for n in selection.notices if n.code is NoticeCode.MISSING_MODALITY]


def test_a_full_study_fills_every_role_and_skips_nothing():
    ct = b.ct_series(6, series_number=2)
    t2 = b.mr_series(5, series_number=3, study_uid=ct.study_uid)
    t1 = b.mr_series(
        5, series_number=4, echo_time=12, repetition_time=550, description="SAG T1", study_uid=ct.study_uid
    )
    xr = b.radiograph(series_number=5, study_uid=ct.study_uid)
    selection = select_series(study_of(ct, t2, t1, xr))
    assert {role: s.series_instance_uid for role, s in selection.chosen.items()} == {
        SeriesRole.CT: ct.series_uid,
        SeriesRole.MR_T2: t2.series_uid,
        SeriesRole.MR_T1: t1.series_uid,
        SeriesRole.XR: xr.series_uid,
    }
    assert selection.notices == []


def test_a_thinner_axial_ct_wins_and_the_other_is_told_why():
    thick = b.ct_series(8, spacing=5.0, series_number=2, description="AX 5mm")
    thin = b.ct_series(40, spacing=1.0, series_number=3, description="AX 1mm", study_uid=thick.study_uid)
    selection = select_series(study_of(thick, thin))
    assert selection.chosen[SeriesRole.CT].series_instance_uid == thin.series_uid
    assert skipped(selection) == {
        thick.series_uid: "CT series 2 'AX 5mm' was not chosen: CT series 3 'AX 1mm' has thinner slices"
    }


def test_coverage_comes_before_thin_slices():
    short_thin = b.ct_series(10, spacing=1.0, series_number=2, description="THIN PART")
    long_thick = b.ct_series(20, spacing=3.0, series_number=3, description="WHOLE NECK", study_uid=short_thin.study_uid)
    selection = select_series(study_of(short_thin, long_thick))
    assert selection.chosen[SeriesRole.CT].series_instance_uid == long_thick.series_uid
    assert "covers more of the patient" in skipped(selection)[short_thin.series_uid]


def test_a_series_with_missing_slices_loses_to_a_complete_one():
    gapped = b.ct_series(offsets=[0, 1, 2, 3, 9, 10, 11, 12], series_number=2, description="GAPPED")
    complete = b.ct_series(12, spacing=1.0, series_number=3, description="COMPLETE", study_uid=gapped.study_uid)
    selection = select_series(study_of(gapped, complete))
    assert selection.chosen[SeriesRole.CT].series_instance_uid == complete.series_uid
    assert "has no missing slices" in skipped(selection)[gapped.series_uid]


def test_equal_series_are_told_apart_by_series_number():
    first = b.ct_series(5, series_number=2, description="A")
    second = b.ct_series(5, series_number=6, description="B", study_uid=first.study_uid)
    selection = select_series(study_of(second, first))
    assert selection.chosen[SeriesRole.CT].series_instance_uid == first.series_uid
    assert "comes first by series number" in skipped(selection)[second.series_uid]


def test_a_non_axial_ct_is_skipped_with_the_reason():
    axial = b.ct_series(5, series_number=2)
    coronal = b.ct_series(5, orientation=b.CORONAL, series_number=7, description="COR MPR", study_uid=axial.study_uid)
    selection = select_series(study_of(axial, coronal))
    assert skipped(selection) == {coronal.series_uid: "CT series 7 'COR MPR' is coronal; axial CT is needed"}


def test_an_axial_mr_is_skipped_because_sagittal_mr_is_needed():
    axial_t2 = b.mr_series(5, orientation=b.AXIAL, series_number=7, description="AX T2")
    selection = select_series(study_of(axial_t2))
    assert skipped(selection) == {axial_t2.series_uid: "MR series 7 'AX T2' is axial; sagittal MR is needed"}
    assert "no usable sagittal T2-weighted MR series (mr_t2)" in missing(selection)


@pytest.mark.parametrize(
    "echo, repetition, description, weighting",
    [
        (100.0, 3000.0, "SAG", MrWeighting.T2),
        (60.0, 2500.0, "SAG", MrWeighting.T2),
        (12.0, 550.0, "SAG", MrWeighting.T1),
        (30.0, 1000.0, "SAG", MrWeighting.T1),
        (40.0, 2000.0, "SAG STIR", MrWeighting.T2),
        (15.0, 2500.0, "sag t1 flair", MrWeighting.T1),
        (None, None, "SAG T2 TSE", MrWeighting.T2),
        (40.0, 2000.0, "SAG PD", None),
        (40.0, 2000.0, "T1 and T2 map", None),
    ],
)
def test_mr_weighting_comes_from_timing_then_from_the_description(echo, repetition, description, weighting):
    series = Series(
        "1.2", "MR", None, "1.2.3", description=description, echo_time_ms=echo, repetition_time_ms=repetition
    )
    assert mr_weighting(series)[0] is weighting


def test_an_mr_of_unknown_weighting_is_skipped_with_its_timing():
    pd = b.mr_series(5, echo_time=40, repetition_time=2000, description="SAG PD", series_number=8)
    selection = select_series(study_of(pd))
    assert skipped(selection)[pd.series_uid] == (
        "MR series 8 'SAG PD' has an unknown weighting: TE 40 ms, TR 2000 ms is neither T1- nor T2-weighted "
        "and the description names neither"
    )


def test_timing_beats_a_misleading_description():
    series = b.mr_series(5, echo_time=110, repetition_time=4000, description="SAG T1 (mislabelled)")
    selection = select_series(study_of(series))
    assert selection.chosen[SeriesRole.MR_T2].series_instance_uid == series.series_uid


@pytest.mark.parametrize(
    "view_position, patient_orientation, view",
    [
        ("LL", None, RadiographView.LATERAL),
        ("RL", ("P", "F"), RadiographView.LATERAL),
        ("LATERAL", None, RadiographView.LATERAL),
        ("AP", ("A", "F"), RadiographView.FRONTAL),  # ViewPosition decides when it names a view
        ("PA", None, RadiographView.FRONTAL),
        (None, ("A", "F"), RadiographView.LATERAL),
        ("", ("P", "FH"), RadiographView.LATERAL),
        (None, ("F", "A"), RadiographView.LATERAL),  # rotated: the column runs front–back
        (None, ("L", "F"), RadiographView.FRONTAL),
        (None, None, RadiographView.UNKNOWN),
        ("OBLIQUE", ("H", "F"), RadiographView.UNKNOWN),
    ],
)
def test_radiograph_view_comes_from_view_position_then_patient_orientation(view_position, patient_orientation, view):
    assert radiograph_view(view_position, patient_orientation) is view


def test_frontal_and_unknown_radiographs_are_skipped_and_the_lateral_chosen():
    lateral = b.radiograph(view_position=None, patient_orientation=("A", "F"), series_number=3)
    frontal = b.radiograph(
        view_position="AP",
        patient_orientation=("L", "F"),
        series_number=4,
        study_uid=lateral.study_uid,
        description="C-SPINE AP",
    )
    unknown = b.radiograph(
        view_position=None,
        patient_orientation=None,
        series_number=5,
        study_uid=lateral.study_uid,
        description="C-SPINE",
    )
    selection = select_series(study_of(lateral, frontal, unknown))
    assert selection.chosen[SeriesRole.XR].series_instance_uid == lateral.series_uid
    assert skipped(selection) == {
        frontal.series_uid: "DX series 4 'C-SPINE AP' is a frontal view (ViewPosition AP); "
        "a lateral radiograph is needed",
        unknown.series_uid: "DX series 5 'C-SPINE' has no ViewPosition or PatientOrientation telling a lateral "
        "view; a lateral radiograph is needed",
    }


def test_roles_without_a_candidate_get_a_missing_modality_notice():
    ct = b.ct_series(4)
    selection = select_series(study_of(ct))
    assert set(selection.chosen) == {SeriesRole.CT}
    assert missing(selection) == [
        "no usable sagittal T2-weighted MR series (mr_t2)",
        "no usable sagittal T1-weighted MR series (mr_t1)",
        "no usable lateral radiograph series (xr)",
    ]


def test_series_that_are_not_analysed_are_skipped_with_the_reason():
    ct = b.ct_series(4, series_number=2)
    us = b.other_modality_image("US", study_uid=ct.study_uid, series_number=9)
    colour = b.colour_image(study_uid=ct.study_uid, series_number=8)
    study = study_of(ct, us, colour, extra=[b.sr_document(study_uid=ct.study_uid)])
    selection = select_series(study)
    reasons = skipped(selection)
    assert reasons[us.series_uid] == "US series 9 'US IMAGE' is not analysed (DICOM modality US)"
    assert reasons[colour.series_uid].startswith("CT series 8 'SCREENSHOT' has no usable volume")
    sr = next(s for s in study.series if s.dicom_modality == "SR")
    assert reasons[sr.series_instance_uid] == "SR series 90 'REPORT' is not analysed (DICOM modality SR)"


def test_every_series_not_chosen_gets_exactly_one_skip_notice():
    ct = b.ct_series(6, series_number=2)
    builts = [
        ct,
        b.ct_series(3, spacing=5.0, series_number=3, study_uid=ct.study_uid),
        b.ct_series(3, orientation=b.SAGITTAL, series_number=4, study_uid=ct.study_uid),
        b.mr_series(4, series_number=5, study_uid=ct.study_uid),
        b.mr_series(4, series_number=6, study_uid=ct.study_uid, spacing=4.0),
        b.mr_series(4, series_number=7, orientation=b.AXIAL, study_uid=ct.study_uid),
        b.radiograph(series_number=8, study_uid=ct.study_uid, syntax=dicom_uid.RLELossless),
        b.radiograph(series_number=9, study_uid=ct.study_uid, view_position="AP"),
    ]
    study = study_of(*builts)
    selection = select_series(study)
    chosen = {s.series_instance_uid for s in selection.chosen.values()}
    skip_uids = [n.series_instance_uid for n in selection.notices if n.code is NoticeCode.SERIES_SKIPPED]
    not_chosen = [s.series_instance_uid for s in study.series if s.series_instance_uid not in chosen]
    assert sorted(skip_uids) == sorted(not_chosen)
    assert len(skip_uids) == len(set(skip_uids)) == len(study.series) - len(chosen)
