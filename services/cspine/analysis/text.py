"""A plain-text report of one study's analysis, as a radiologist would skim it: what the models were trained
on; per modality the series used, whether it could be assessed (and why not), lesions and probabilities;
the fused assessment; spine measurements; notices."""

from __future__ import annotations

from cspine.domain import Assessment, StudyAnalysis


def _probabilities(assessment: Assessment | None) -> str:
    if assessment is None or not assessment.probabilities:
        return "not classified"
    parts = ", ".join(f"{p.label} {p.probability:.2f}" for p in assessment.probabilities)
    return f"{parts} (uncertainty {assessment.uncertainty:.2f})"


def _value(value: float | None, unit: str, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}{unit}"


def _not_assessable(assessment: Assessment) -> list[str]:
    return ["    NOT ASSESSABLE — no tumor call:"] + [f"      [{r.code.value}] {r.message}" for r in assessment.reasons]


def format_analysis(analysis: StudyAnalysis) -> str:
    lines = []
    if analysis.disclosure is not None:
        lines.append(f"NOTE   {analysis.disclosure.text}")
    lines.append(f"prototype set {analysis.prototype_set_version}")
    for result in analysis.modalities:
        series = "; ".join(
            f"{s.role.value}: {s.description or s.series_instance_uid} ({s.slices})" for s in result.series
        )
        lines.append(f"{result.modality.value}  series {series}")
        if result.ood is not None:
            lines.append(f"    out-of-distribution score {result.ood.score:.2f} (threshold {result.ood.threshold:.2f})")
        if not result.assessment.assessed:
            lines.extend(_not_assessable(result.assessment))
            continue
        if not result.lesions:
            lines.append(f"    no lesion (detection score {result.assessment.detection_score:.2f})")
        for index, lesion in enumerate(result.lesions[:3], start=1):
            size = f"{lesion.volume_ml:.2f} mL" if lesion.volume_ml is not None else f"{lesion.area_mm2:.0f} mm²"
            lines.append(
                f"    lesion {index}: {lesion.vertebral_level} ({', '.join(lesion.levels)}), "
                f"{lesion.max_diameter_mm:.1f} mm, {size}; {_probabilities(lesion.assessment)}"
            )
        if len(result.lesions) > 3:
            lines.append(f"    … and {len(result.lesions) - 3} smaller")
    fused = analysis.fused
    if fused.assessed:
        verdict = "tumor detected" if fused.tumor_detected else "no tumor detected"
        source = f" from {' + '.join(m.value for m in fused.classified_from)}" if fused.classified_from else ""
        lines.append(f"FUSED  {verdict} (score {fused.detection_score:.2f}); {_probabilities(fused)}{source}")
    else:
        lines.append("FUSED  not assessable: no tumor call")
        lines.extend(f"       [{r.code.value}] {r.message}" for r in fused.reasons)
    spine = analysis.spine
    lines.append("spine  level  canal mm²  cord mm²  cord AP/LR  disc mm")
    for m in spine.levels:
        lines.append(
            f"       {m.level:5}  {_value(m.canal_area_mm2, '', 0):>9}  {_value(m.cord_area_mm2, '', 0):>8}  "
            f"{_value(m.cord_compression_ratio, '', 2):>10}  {_value(m.disc_height_mm, '', 1):>7}"
        )
    if spine.cobb_angle_deg is not None:
        source = f" (from {spine.cobb_source.value})" if spine.cobb_source is not None else ""
        lines.append(f"       C2–C7 Cobb {spine.cobb_angle_deg:.1f}°{source}")
    if spine.opll is not None:
        opll = spine.opll
        lines.append(
            f"       OPLL {'present at ' + ', '.join(opll.levels) if opll.present else 'not seen'}"
            + (f", occupying ratio {opll.occupying_ratio:.2f}" if opll.present else "")
        )
    for notice in analysis.notices:
        lines.append(f"notice {notice.code.value}: {notice.message}")
    return "\n".join(lines)
