"""Series selection: the series each role uses (axial CT, sagittal T2/T1 MR, lateral radiograph), and why
every other series is not used.

``select_series(study)`` looks at each series once:

* a series fills at most one role: CT → ``ct``; MR → ``mr_t2`` or ``mr_t1`` by its weighting; DX/CR → ``xr``;
* it must have a volume and the role's plane: axial CT, sagittal MR, a lateral radiograph;
* MR weighting comes from the timing first: T2-weighted when TE ≥ 60 ms, T1-weighted when TE ≤ 30 ms and
  TR ≤ 1000 ms; otherwise the SeriesDescription decides ("T2" or "STIR" → T2, "T1" → T1), and a series
  with neither is skipped with the reason;
* a radiograph is lateral when ViewPosition says so (LL, RL, LAT, LATERAL) or, without a ViewPosition,
  when PatientOrientation's row (or, for a rotated image, column) points anterior/posterior;
* among the candidates of a role the preference is a sort key, compared component by component (the first
  component that differs decides, and names the reason the loser is given):

  cross-sectional (CT, MR): acquired, not derived (ImageType; a plain reformat counts as acquired) and not a
  localizer → covers at least 90 % of the longest candidate's extent along the slice axis →
  has no missing slices → thinner slice spacing → more slices → finer pixels → lower series number.
  Coverage comes first because a thin series that misses half the cervical spine is useless; thin slices
  next because they resolve small lesions and the canal; the rest only break ties.

  radiograph: acquired, not derived → larger field of view → finer pixels → lower series number.

Every series not chosen gets a SERIES_SKIPPED notice saying why; a role with no candidate gets a
MISSING_MODALITY notice.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cspine.domain import (
    Modality,
    Notice,
    NoticeCode,
    Orientation,
    Selection,
    Series,
    SeriesRole,
    Study,
    Volume,
)

logger = logging.getLogger(__name__)

__all__ = [
    "MrWeighting",
    "RadiographView",
    "image_type",
    "is_derived",
    "mr_weighting",
    "radiograph_view",
    "select_series",
    "series_name",
]


class RadiographView(str, enum.Enum):
    """The projection of a radiograph, as far as its header tells."""

    LATERAL = "lateral"
    FRONTAL = "frontal"  # AP or PA
    UNKNOWN = "unknown"


class MrWeighting(str, enum.Enum):
    T1 = "T1"
    T2 = "T2"


_VIEW_BY_VIEW_POSITION = {
    "LL": RadiographView.LATERAL,
    "RL": RadiographView.LATERAL,
    "LAT": RadiographView.LATERAL,
    "LATERAL": RadiographView.LATERAL,
    "AP": RadiographView.FRONTAL,
    "PA": RadiographView.FRONTAL,
}
# The dominant (first) letter of a PatientOrientation direction, and the view it implies.
_VIEW_BY_DIRECTION_LETTER = {
    "A": RadiographView.LATERAL,
    "P": RadiographView.LATERAL,
    "L": RadiographView.FRONTAL,
    "R": RadiographView.FRONTAL,
}

T2_MIN_ECHO_MS = 60.0
T1_MAX_ECHO_MS = 30.0
T1_MAX_REPETITION_MS = 1000.0
# SeriesDescription hints, used only when the timing is ambiguous.
_WEIGHTING_HINTS = (
    (MrWeighting.T2, re.compile(r"(?<![A-Z0-9])(T2|STIR)", re.IGNORECASE)),
    (MrWeighting.T1, re.compile(r"(?<![A-Z0-9])T1(?![0-9])", re.IGNORECASE)),
)
_ROLE_BY_WEIGHTING = {MrWeighting.T1: SeriesRole.MR_T1, MrWeighting.T2: SeriesRole.MR_T2}

_COVERAGE_FRACTION = 0.9


def radiograph_view(view_position: str | None, patient_orientation: Sequence[str] | None) -> RadiographView:
    """Lateral, frontal or unknown: ViewPosition decides when it names a view; otherwise PatientOrientation's
    row direction (its column, when the row runs head–foot in a rotated image)."""
    explicit = _VIEW_BY_VIEW_POSITION.get((view_position or "").strip().upper())
    if explicit is not None:
        return explicit
    if not patient_orientation or len(patient_orientation) != 2:
        return RadiographView.UNKNOWN
    row, column = (str(direction).strip().upper()[:1] for direction in patient_orientation)
    return _VIEW_BY_DIRECTION_LETTER.get(row) or _VIEW_BY_DIRECTION_LETTER.get(column) or RadiographView.UNKNOWN


def mr_weighting(series: Series) -> tuple[MrWeighting | None, str]:
    """(weighting, what decided it) — or (None, why it is unknown)."""
    te, tr = series.echo_time_ms, series.repetition_time_ms
    timing = f"TE {te:g} ms" if te is not None else "no TE"
    timing += f", TR {tr:g} ms" if tr is not None else ", no TR"
    if te is not None and te >= T2_MIN_ECHO_MS:
        return MrWeighting.T2, timing
    if te is not None and tr is not None and te <= T1_MAX_ECHO_MS and tr <= T1_MAX_REPETITION_MS:
        return MrWeighting.T1, timing
    hinted = {weighting for weighting, pattern in _WEIGHTING_HINTS if pattern.search(series.description or "")}
    if len(hinted) == 1:
        weighting = hinted.pop()
        return weighting, f"{timing} is ambiguous; the description says {weighting.value}"
    return None, f"{timing} is neither T1- nor T2-weighted and the description names neither"


# A DERIVED image is a computed one (a perfusion map, a subtraction …) unless it only reformats acquired
# pixels (an axial or sagittal MPR); localizers are projections for planning, not the images to read.
REFORMAT_TYPES = frozenset({"REFORMATTED", "MPR"})
LOCALIZER_TYPES = frozenset({"LOCALIZER", "SCOUT", "TOPOGRAM", "SCANOGRAM"})


def image_type(series: Series) -> tuple[str, ...]:
    """The series' ImageType values, upper case (empty when absent)."""
    header = series.headers[0] if series.headers else None
    try:
        value = header.get("ImageType") if header is not None else None
    except Exception:  # an unreadable optional attribute is an absent one
        return ()
    if not value:
        return ()
    values = value.split("\\") if isinstance(value, str) else value
    return tuple(str(v).strip().upper() for v in values)


def is_derived(series: Series) -> bool:
    """DERIVED or SECONDARY pixels that are more than a reformat, or a localizer."""
    kind = image_type(series)
    if LOCALIZER_TYPES & set(kind):
        return True
    computed = bool(kind) and (kind[0] == "DERIVED" or (len(kind) > 1 and kind[1] == "SECONDARY"))
    return computed and not REFORMAT_TYPES & set(kind)


def series_name(series: Series) -> str:
    """How notices name a series: "MR series 7 'AX T2'"."""
    number = series.series_number if series.series_number is not None else "?"
    name = f"{series.dicom_modality or 'unknown'} series {number}"
    return f"{name} '{series.description}'" if series.description else name


# --------------------------------------------------------------------------------------------------------
# Preferences: (reason the loser is told, key component; smaller is better)


@dataclass(frozen=True)
class _Context:
    best_coverage_mm: float
    gapped: frozenset[str]  # series with a MISSING_SLICES notice


def _volume(series: Series) -> Volume:
    """A candidate's volume: a series without one is never a candidate (``_role_of``)."""
    assert series.volume is not None
    return series.volume


def _coverage_mm(series: Series) -> float:
    volume = _volume(series)
    return float(volume.slice_offsets[-1] - volume.slice_offsets[0]) + (volume.slice_spacing or 0.0)


def _pixel_area_key(series: Series, context: _Context) -> float:
    spacing = _volume(series).pixel_spacing
    return round(spacing[0] * spacing[1], 4)


def _field_of_view_key(series: Series, context: _Context) -> int:
    volume = _volume(series)
    return -round(volume.shape[1] * volume.pixel_spacing[0] * volume.shape[2] * volume.pixel_spacing[1] / 100)


def _series_number_key(series: Series, context: _Context) -> Any:
    return (series.series_number is None, series.series_number or 0, series.series_instance_uid)


_CROSS_SECTIONAL_PREFERENCE: tuple[tuple[str, Callable[[Series, _Context], Any]], ...] = (
    ("is an acquired image, not a derived one or a localizer", lambda s, c: is_derived(s)),
    ("covers more of the patient", lambda s, c: _coverage_mm(s) < _COVERAGE_FRACTION * c.best_coverage_mm),
    ("has no missing slices", lambda s, c: s.series_instance_uid in c.gapped),
    ("has thinner slices", lambda s, c: round(_volume(s).slice_spacing, 2)),
    ("has more slices", lambda s, c: -_volume(s).shape[0]),
    ("has finer pixels", _pixel_area_key),
    ("comes first by series number", _series_number_key),
)
_RADIOGRAPH_PREFERENCE: tuple[tuple[str, Callable[[Series, _Context], Any]], ...] = (
    ("is an acquired image, not a derived one or a localizer", lambda s, c: is_derived(s)),
    ("has a larger field of view", _field_of_view_key),
    ("has finer pixels", _pixel_area_key),
    ("comes first by series number", _series_number_key),
)


# --------------------------------------------------------------------------------------------------------
# Roles


def _plane_reason(required: Orientation, what: str) -> Callable[[Series], str | None]:
    def reason(series: Series) -> str | None:
        if series.orientation is required:
            return None
        return f"is {series.orientation.value}; {required.value} {what} is needed"

    return reason


def _radiograph_reason(series: Series) -> str | None:
    header = series.headers[0] if series.headers else None
    orientation = _patient_orientation(header)
    view = radiograph_view(series.view_position, orientation)
    if view is RadiographView.LATERAL:
        return None
    if view is RadiographView.FRONTAL:
        how = f"ViewPosition {series.view_position}" if series.view_position else "by PatientOrientation"
        return f"is a frontal view ({how}); a lateral radiograph is needed"
    return "has no ViewPosition or PatientOrientation telling a lateral view; a lateral radiograph is needed"


def _patient_orientation(header: Any) -> list[str] | None:
    try:
        value = header.get("PatientOrientation") if header is not None else None
    except Exception:  # an unreadable optional attribute is an absent one
        return None
    if not value:
        return None
    return [str(v) for v in value] if not isinstance(value, str) else value.split("\\")


@dataclass(frozen=True)
class _RoleSpec:
    need: str  # what the role needs, in words
    plane: Callable[[Series], str | None]  # why a series of the right modality does not fit, or None
    preference: tuple[tuple[str, Callable[[Series, _Context], Any]], ...]


_ROLES: dict[SeriesRole, _RoleSpec] = {
    SeriesRole.CT: _RoleSpec("axial CT", _plane_reason(Orientation.AXIAL, "CT"), _CROSS_SECTIONAL_PREFERENCE),
    SeriesRole.MR_T2: _RoleSpec(
        "sagittal T2-weighted MR", _plane_reason(Orientation.SAGITTAL, "MR"), _CROSS_SECTIONAL_PREFERENCE
    ),
    SeriesRole.MR_T1: _RoleSpec(
        "sagittal T1-weighted MR", _plane_reason(Orientation.SAGITTAL, "MR"), _CROSS_SECTIONAL_PREFERENCE
    ),
    SeriesRole.XR: _RoleSpec("lateral radiograph", _radiograph_reason, _RADIOGRAPH_PREFERENCE),
}


def _role_of(series: Series) -> tuple[SeriesRole | None, str | None]:
    """The role a series could fill, or (None, why none)."""
    if series.modality is None:
        return None, f"is not analysed (DICOM modality {series.dicom_modality or 'unknown'})"
    if series.volume is None:
        return None, "has no usable volume (see the ingest notice for this series)"
    if series.modality is Modality.MR:
        weighting, how = mr_weighting(series)
        if weighting is None:
            return None, f"has an unknown weighting: {how}"
        return _ROLE_BY_WEIGHTING[weighting], None
    return _ROLE_BY_MODALITY[series.modality], None


_ROLE_BY_MODALITY = {Modality.CT: SeriesRole.CT, Modality.XR: SeriesRole.XR}


def _ranked(candidates: list[Series], spec: _RoleSpec, context: _Context) -> list[tuple[tuple, Series]]:
    keyed = [(tuple(key(s, context) for _, key in spec.preference), s) for s in candidates]
    return sorted(keyed, key=lambda pair: pair[0])


def _lost_because(loser: tuple, winner: tuple, spec: _RoleSpec) -> str:
    for (reason, _), a, b in zip(spec.preference, loser, winner, strict=True):
        if a != b:
            return reason
    return spec.preference[-1][0]


def select_series(study: Study) -> Selection:
    """Pick the series for each role; every other series gets a SERIES_SKIPPED notice saying why."""
    gapped = frozenset(
        n.series_instance_uid
        for n in study.notices
        if n.code is NoticeCode.MISSING_SLICES and n.series_instance_uid is not None
    )
    candidates: dict[SeriesRole, list[Series]] = {role: [] for role in _ROLES}
    skipped: list[tuple[Series, str]] = []
    for series in study.series:
        role, reason = _role_of(series)
        if role is not None:
            reason = _ROLES[role].plane(series)
            if reason is None:
                candidates[role].append(series)
                continue
        skipped.append((series, reason or "is not usable"))

    chosen: dict[SeriesRole, Series] = {}
    notices: list[Notice] = []
    for role, spec in _ROLES.items():
        if not candidates[role]:
            notices.append(Notice(NoticeCode.MISSING_MODALITY, f"no usable {spec.need} series ({role.value})"))
            continue
        context = _Context(max(_coverage_mm(s) for s in candidates[role]), gapped)
        ranked = _ranked(candidates[role], spec, context)
        winner_key, winner = ranked[0]
        chosen[role] = winner
        for key, loser in ranked[1:]:
            why = _lost_because(key, winner_key, spec)
            skipped.append((loser, f"was not chosen: {series_name(winner)} {why}"))

    order = {id(s): n for n, s in enumerate(study.series)}
    for series, reason in sorted(skipped, key=lambda pair: order[id(pair[0])]):
        notices.append(Notice(NoticeCode.SERIES_SKIPPED, f"{series_name(series)} {reason}", series.series_instance_uid))
    logger.info("selected %d of %d series: %s", len(chosen), len(study.series), ", ".join(r.value for r in chosen))
    return Selection(chosen=chosen, notices=notices)
