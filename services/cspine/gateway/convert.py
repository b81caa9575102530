"""Domain ⇄ protobuf for the API v1: nothing else. Closed sets convert through tables."""

from __future__ import annotations

from datetime import UTC

from cspine.client.enums import MODALITY_FROM_PB, MODALITY_TO_PB, STATUS_TO_PB
from cspine.domain import (
    Assessment,
    Disclosure,
    Lesion,
    LevelMeasurement,
    ModalityResult,
    SpineMeasurements,
    StudyAnalysis,
)
from cspine.errors import InvalidInputError
from cspine.fewshot.prototypes import ClassSupport, PrototypeSet
from cspine.fewshot.store import Case, VersionInfo
from cspine.gateway.upload import UploadTimeouts
from cspine.pipeline import AnalysisOptions
from cspine.service import ServiceInfo
from cspine.v1 import analysis_pb2 as pb
from cspine.v1 import support_pb2 as spb


def options_from_pb(options: pb.AnalysisOptions | None, deadline_s: float | None) -> AnalysisOptions:
    if options is None:
        return AnalysisOptions(deadline_s=deadline_s)
    unknown = sorted(m for m in options.modalities if m not in MODALITY_FROM_PB)
    if unknown:
        raise InvalidInputError(
            f"AnalysisOptions.modalities holds {unknown[0]}, which is no Modality of this API (CT = 1, MR = 2, XR = 3)"
        )
    # MODALITY_UNSPECIFIED, the one value without a domain Modality, asks for nothing
    modalities = frozenset(modality for m in options.modalities if (modality := MODALITY_FROM_PB[m]) is not None)
    return AnalysisOptions(
        return_dicom_seg=options.return_dicom_seg,
        return_dicom_sr=options.return_dicom_sr,
        modalities=modalities or None,
        deadline_s=deadline_s,
    )


def assessment_to_pb(a: Assessment) -> pb.Assessment:
    out = pb.Assessment(
        tumor_detected=a.tumor_detected,
        probabilities=[pb.ClassProbability(label=p.label, probability=p.probability) for p in a.probabilities],
        uncertainty=a.uncertainty,
        status=STATUS_TO_PB[a.status],
        reasons=[
            pb.NotAssessableReason(code=r.code.value, layer=r.code.layer.value, message=r.message) for r in a.reasons
        ],
        status_message=a.status_message,
        classified_from=[MODALITY_TO_PB[m] for m in a.classified_from],
    )
    if a.detection_score is not None:
        out.detection_score = a.detection_score
    return out


def disclosure_to_pb(d: Disclosure | None) -> pb.ModelDisclosure | None:
    return pb.ModelDisclosure(trained_on=d.trained_on, intended_use=d.intended_use) if d is not None else None


def lesion_to_pb(lesion: Lesion) -> pb.Lesion:
    out = pb.Lesion(
        vertebral_level=lesion.vertebral_level,
        max_diameter_mm=lesion.max_diameter_mm,
        levels=list(lesion.levels),
        centre_mm=list(lesion.centre_mm),
        bbox_min_mm=list(lesion.bbox_min_mm),
        bbox_max_mm=list(lesion.bbox_max_mm),
        series_instance_uid=lesion.series_instance_uid,
    )
    if lesion.volume_ml is not None:
        out.volume_ml = lesion.volume_ml
    if lesion.area_mm2 is not None:
        out.area_mm2 = lesion.area_mm2
    if lesion.assessment is not None:
        out.assessment.CopyFrom(assessment_to_pb(lesion.assessment))
    return out


def modality_to_pb(result: ModalityResult) -> pb.ModalityResult:
    return pb.ModalityResult(
        modality=MODALITY_TO_PB[result.modality],
        series=[
            pb.SeriesUsed(
                role=s.role.value, series_instance_uid=s.series_instance_uid, description=s.description, slices=s.slices
            )
            for s in result.series
        ],
        lesions=[lesion_to_pb(lesion) for lesion in result.lesions],
        assessment=assessment_to_pb(result.assessment),
        ood=pb.OutOfDistribution(score=result.ood.score, threshold=result.ood.threshold) if result.ood else None,
    )


_LEVEL_VALUES = ("canal_area_mm2", "cord_area_mm2", "cord_compression_ratio", "disc_height_mm")


def level_to_pb(m: LevelMeasurement) -> pb.LevelMeasurement:
    out = pb.LevelMeasurement(
        level=m.level,
        canal_source=MODALITY_TO_PB[m.canal_source],
        cord_source=MODALITY_TO_PB[m.cord_source],
        disc_source=MODALITY_TO_PB[m.disc_source],
    )
    for name in _LEVEL_VALUES:
        value = getattr(m, name)
        if value is not None:
            setattr(out, name, value)
    return out


def spine_to_pb(spine: SpineMeasurements) -> pb.SpineMeasurements:
    out = pb.SpineMeasurements(
        levels=[level_to_pb(m) for m in spine.levels], cobb_source=MODALITY_TO_PB[spine.cobb_source]
    )
    if spine.cobb_angle_deg is not None:
        out.cobb_angle_deg = spine.cobb_angle_deg
    if spine.opll is not None:
        out.opll.CopyFrom(
            pb.Opll(
                present=spine.opll.present,
                occupying_ratio=spine.opll.occupying_ratio,
                max_thickness_mm=spine.opll.max_thickness_mm,
                levels=list(spine.opll.levels),
            )
        )
    return out


def analysis_to_pb(analysis: StudyAnalysis, request_id: str) -> pb.StudyAnalysis:
    return pb.StudyAnalysis(
        study_instance_uid=analysis.study_instance_uid,
        modalities=[modality_to_pb(r) for r in analysis.modalities],
        fused=assessment_to_pb(analysis.fused),
        spine=spine_to_pb(analysis.spine),
        prototype_set_version=analysis.prototype_set_version,
        models=[pb.ModelVersion(name=m.name, version=m.version) for m in analysis.models],
        notices=[
            pb.Notice(code=n.code.value, message=n.message, series_instance_uid=n.series_instance_uid or "")
            for n in analysis.notices
        ],
        dicom_seg=analysis.dicom_seg or b"",
        dicom_sr=analysis.dicom_sr or b"",
        stage_seconds=analysis.stage_seconds,
        request_id=request_id,
        disclosure=disclosure_to_pb(analysis.disclosure),
    )


def info_to_pb(info: ServiceInfo, max_message_bytes: int, timeouts: UploadTimeouts) -> pb.ServiceInfo:
    return pb.ServiceInfo(
        version=info.version,
        models=[pb.ModelVersion(name=m.name, version=m.version) for m in info.models],
        prototype_set_version=info.prototype_set_version,
        labels=list(info.labels),
        synthetic_support_set=info.synthetic_support_set,
        disclosure=disclosure_to_pb(info.disclosure),
        limits=pb.Limits(
            max_instances=info.limits.max_instances,
            max_study_bytes=info.limits.max_study_bytes,
            max_study_voxels=info.limits.max_study_voxels,
            max_studies_in_flight=info.max_studies_in_flight,
            max_message_bytes=max_message_bytes,
            max_queued_studies=info.max_queued_studies,
            max_frame_bytes=info.limits.max_frame_bytes,
            upload_deadline_s=timeouts.deadline_s,
            idle_timeout_s=timeouts.idle_s,
            max_study_model_bytes=info.limits.max_study_model_bytes,
        ),
    )


def _rfc3339(moment) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def version_to_pb(
    info: VersionInfo, prototypes: PrototypeSet, counts: dict[str, int] | None = None
) -> spb.PrototypeSetInfo:
    """A version and its prototype set: per class its site and default cases and the weights the rule gave
    them (``prototypes.composition``); ``counts`` (cases per class) only for a set made without one."""
    composition = {c.label: c for c in prototypes.composition}
    return spb.PrototypeSetInfo(
        version=prototypes.version,
        number=info.number,
        classes=[
            _class_to_pb(label, composition.get(label), (counts or {}).get(label, 0)) for label in prototypes.labels
        ],
        created_at=_rfc3339(info.created_at),
        created_by=info.created_by,
        change=info.change,
        modalities=[MODALITY_TO_PB[m] for m in prototypes.prototypes],
        cases=info.case_count,
        site_cases_to_replace=prototypes.site_cases_to_replace,
        adaptation=prototypes.adaptation,
        fusion_weights=[
            spb.FusionWeight(modality=MODALITY_TO_PB[m], weight=w) for m, w in prototypes.fusion_weights.items()
        ],
    )


def _class_to_pb(label: str, support: ClassSupport | None, cases: int) -> spb.ClassInfo:
    if support is None:
        return spb.ClassInfo(label=label, cases=cases)
    return spb.ClassInfo(
        label=label,
        cases=support.site_cases + support.default_cases,
        site_cases=support.site_cases,
        default_cases=support.default_cases,
        weights=[
            spb.ModalityWeight(
                modality=MODALITY_TO_PB[w.modality],
                site_cases=w.site_cases,
                default_cases=w.default_cases,
                site_weight=w.site_weight,
            )
            for w in support.modalities
        ],
    )


def case_to_pb(case: Case) -> spb.SupportCase:
    return spb.SupportCase(
        case_id=case.id,
        label=case.label,
        pathology_reference=case.pathology_reference,
        note=case.note,
        curator=case.curator,
        created_at=_rfc3339(case.created_at),
        synthetic=case.synthetic,
        modalities=[MODALITY_TO_PB[m] for m in case.modalities],
        embedding=case.embedding,
        other_embedding=not case.in_use,
    )
