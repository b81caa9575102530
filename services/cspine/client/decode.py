"""The server's answers as what a client shows: a StudyAnalysis as domain objects (which
``analysis.text.format_analysis`` prints) or as JSON without its SEG and SR bytes (which are written to files
as they come), why a SEG or SR is missing, and support-set versions and cases as one-line summaries (and a
version's classes, with the weights of their site cases, as a table)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import numpy as np
from google.protobuf import json_format

from cspine import domain
from cspine.client.enums import MODALITY_FROM_PB, MODALITY_NAMES, STATUS_FROM_PB
from cspine.v1 import analysis_pb2 as pb
from cspine.v1 import support_pb2 as spb

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnknownCode:
    """A notice code or series role this client does not know, sent by a newer server.

    It stands in for ``domain.NoticeCode`` / ``domain.SeriesRole`` (same ``value`` attribute), so the notice
    or series is kept, verbatim, and the report still shows it; comparisons with known members are False.
    """

    value: str

    def __str__(self) -> str:
        return self.value


def _f32(value: float) -> float:
    """A float32 from the wire as the shortest decimal that gives it back: 23.4, not 23.399999618530273."""
    return float(str(np.float32(value)))


def _floats(values: Iterable[float]) -> tuple[float, ...]:
    return tuple(_f32(v) for v in values)


def _point(values: Iterable[float]) -> tuple[float, float, float]:
    """A point in patient millimetres (x, y, z) as the server sent it."""
    return cast("tuple[float, float, float]", _floats(values))


def _optional(message, name: str) -> float | None:
    return _f32(getattr(message, name)) if message.HasField(name) else None


def _code(enum: type[domain.NoticeCode] | type[domain.SeriesRole] | type[domain.ReasonCode], value: str):
    try:
        return enum(value)
    except ValueError:
        logger.warning("unknown %s %r from the server: kept as text", enum.__name__, value)
        return UnknownCode(value)


def _reason(msg: pb.NotAssessableReason) -> domain.Reason:
    return domain.Reason(_code(domain.ReasonCode, msg.code), msg.message)


def _assessment(msg: pb.Assessment) -> domain.Assessment:
    """An older server sends no status: its assessments were all made, so ASSESSED."""
    return domain.Assessment(
        tumor_detected=msg.tumor_detected,
        detection_score=_optional(msg, "detection_score"),
        probabilities=tuple(domain.ClassProbability(p.label, _f32(p.probability)) for p in msg.probabilities),
        uncertainty=_f32(msg.uncertainty),
        status=STATUS_FROM_PB.get(msg.status, domain.AssessmentStatus.ASSESSED),
        reasons=tuple(_reason(r) for r in msg.reasons),
        classified_from=tuple(m for v in msg.classified_from if (m := MODALITY_FROM_PB.get(v)) is not None),
    )


def _lesion(msg: pb.Lesion) -> domain.Lesion:
    return domain.Lesion(
        vertebral_level=msg.vertebral_level,
        levels=tuple(msg.levels),
        max_diameter_mm=_f32(msg.max_diameter_mm),
        volume_ml=_optional(msg, "volume_ml"),
        area_mm2=_optional(msg, "area_mm2"),
        centre_mm=_point(msg.centre_mm),
        bbox_min_mm=_point(msg.bbox_min_mm),
        bbox_max_mm=_point(msg.bbox_max_mm),
        series_instance_uid=msg.series_instance_uid,
        assessment=_assessment(msg.assessment) if msg.HasField("assessment") else None,
    )


def _modality_result(msg: pb.ModalityResult) -> domain.ModalityResult | None:
    modality = MODALITY_FROM_PB.get(msg.modality)
    if modality is None:
        logger.warning("a result for modality %d, which this client does not know, is left out", msg.modality)
        return None
    return domain.ModalityResult(
        modality=modality,
        series=tuple(
            domain.SeriesUsed(_code(domain.SeriesRole, s.role), s.series_instance_uid, s.description, s.slices)
            for s in msg.series
        ),
        lesions=[_lesion(lesion) for lesion in msg.lesions],
        assessment=_assessment(msg.assessment),
        ood=domain.OodScore(_f32(msg.ood.score), _f32(msg.ood.threshold)) if msg.HasField("ood") else None,
    )


def _level(msg: pb.LevelMeasurement) -> domain.LevelMeasurement:
    return domain.LevelMeasurement(
        level=msg.level,
        canal_area_mm2=_optional(msg, "canal_area_mm2"),
        cord_area_mm2=_optional(msg, "cord_area_mm2"),
        cord_compression_ratio=_optional(msg, "cord_compression_ratio"),
        disc_height_mm=_optional(msg, "disc_height_mm"),
        canal_source=MODALITY_FROM_PB.get(msg.canal_source),
        cord_source=MODALITY_FROM_PB.get(msg.cord_source),
        disc_source=MODALITY_FROM_PB.get(msg.disc_source),
    )


def _spine(msg: pb.SpineMeasurements) -> domain.SpineMeasurements:
    opll = msg.opll
    return domain.SpineMeasurements(
        levels=[_level(m) for m in msg.levels],
        cobb_angle_deg=_optional(msg, "cobb_angle_deg"),
        cobb_source=MODALITY_FROM_PB.get(msg.cobb_source),
        opll=domain.OpllMeasurement(
            opll.present, _f32(opll.occupying_ratio), _f32(opll.max_thickness_mm), tuple(opll.levels)
        )
        if msg.HasField("opll")
        else None,
    )


def to_domain(msg: pb.StudyAnalysis) -> domain.StudyAnalysis:
    """A StudyAnalysis message as the domain object ``analysis.text.format_analysis`` prints.

    Absent optional values become None, MODALITY_UNSPECIFIED becomes None, empty SEG/SR bytes None. What
    this client is too old to know is kept where it can be: an unknown notice code or series role becomes
    an ``UnknownCode`` holding the text; a result for an unknown modality is left out (logged). The
    ``request_id`` has no domain field: read it from the message.
    """
    results = [_modality_result(r) for r in msg.modalities]
    return domain.StudyAnalysis(
        study_instance_uid=msg.study_instance_uid,
        modalities=[r for r in results if r is not None],
        fused=_assessment(msg.fused) if msg.HasField("fused") else domain.Assessment(False, 0.0),
        spine=_spine(msg.spine),
        prototype_set_version=msg.prototype_set_version,
        models=[domain.ModelVersion(m.name, m.version) for m in msg.models],
        notices=[
            domain.Notice(_code(domain.NoticeCode, n.code), n.message, n.series_instance_uid or None)
            for n in msg.notices
        ],
        stage_seconds={name: _f32(seconds) for name, seconds in msg.stage_seconds.items()},
        dicom_seg=msg.dicom_seg or None,
        dicom_sr=msg.dicom_sr or None,
        disclosure=domain.Disclosure(msg.disclosure.trained_on, msg.disclosure.intended_use)
        if msg.HasField("disclosure")
        else None,
    )


def analysis_json(msg: pb.StudyAnalysis) -> str:
    """The message as JSON (proto field names, zeros and empty lists included), without the SEG and SR bytes."""
    shown = pb.StudyAnalysis()
    shown.CopyFrom(msg)
    shown.ClearField("dicom_seg")  # cleared before the conversion, which would base64-encode megabytes
    shown.ClearField("dicom_sr")
    fields = json_format.MessageToDict(
        shown, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    fields.pop("dicom_seg", None)
    fields.pop("dicom_sr", None)
    return json.dumps(fields, indent=2, ensure_ascii=False)


def why_missing(msg: pb.StudyAnalysis, kind: str) -> str:
    """Why the server returned no DICOM ``kind`` (SEG, SR): its output_unavailable notice, on one line."""
    prefix = f"DICOM {kind} "
    notes = [n.message for n in msg.notices if n.code == "output_unavailable" and n.message.startswith(prefix)]
    return " ".join(notes[0].split()) if notes else f"the server returned no DICOM {kind}"


def format_version(info: spb.PrototypeSetInfo) -> str:
    """A prototype-set version in two lines: its cases, classes and modalities; when, by whom and why."""
    classes = ", ".join(f"{c.label} ({c.cases})" for c in info.classes)
    modalities = ",".join(MODALITY_NAMES.get(m, "?") for m in info.modalities)
    return (
        f"prototype set {info.version}: {info.cases} cases; classes {classes}; prototypes for {modalities}\n"
        f"  {info.created_at} by {info.created_by}: {info.change}"
    )


def format_weights(info: spb.PrototypeSetInfo) -> str:
    """Which cases make each class's prototypes, as a table: its site cases, its SYNTHETIC default cases, and per
    modality the share of the prototype its site cases get (— where the class has no case of it), then the rule.
    Empty for a server that does not say (one older than the rule)."""
    if not info.site_cases_to_replace:
        return ""
    k = info.site_cases_to_replace
    modalities = sorted(MODALITY_NAMES)
    width = max([5, *(len(c.label) for c in info.classes)])
    lines = [
        f"  {'class':<{width}}  {'site':>5}  {'default':>7}  "
        + "  ".join(f"{MODALITY_NAMES[m]:>4}" for m in modalities)
        + "   (share of each prototype from the site's cases)"
    ]
    for c in info.classes:
        weights = {w.modality: w.site_weight for w in c.weights}
        cells = "  ".join(f"{weights[m]:>4.0%}" if m in weights else f"{'—':>4}" for m in modalities)
        lines.append(f"  {c.label:<{width}}  {c.site_cases:>5}  {c.default_cases:>7}  {cells}")
    lines.append(
        f"  rule: per class and modality, prototype = w · site mean + (1 − w) · default mean, w = min(n, {k})/{k}"
    )
    lines.append(
        f"  for n site cases (w = 1 without default cases): {k} site cases replace the default (docs/support.md)"
    )
    if info.adaptation and info.adaptation != "plain":
        lines.append(f"  then {info.adaptation}: the prototypes moved to classify them better (docs/support.md)")
    if info.fusion_weights:
        pooled = ", ".join(f"{MODALITY_NAMES.get(w.modality, '?')} {w.weight:.3g}" for w in info.fusion_weights)
        lines.append(f"  fusion weights refitted to the site's cases (held out, 5 folds): {pooled}")
    return "\n".join(lines)


def format_case(case: spb.SupportCase) -> str:
    """A support case in one line: id, label, modalities, when and by whom, its pathology reference, and whether
    another lesion embedding than the served one made it (then it is not in the prototypes)."""
    modalities = ",".join(MODALITY_NAMES.get(m, "?") for m in case.modalities)
    synthetic = " SYNTHETIC" if case.synthetic else ""
    note = f" — {case.note}" if case.note else ""
    unused = ""
    if case.other_embedding:
        unused = f" [not in use: made by embedding {case.embedding or 'of version 1'}]"
    return (
        f"{case.case_id:>6}  {case.label:<12} {modalities:<9} {case.created_at}  {case.curator}{synthetic}  "
        f"{case.pathology_reference}{note}{unused}"
    )
