"""Competence: whether cspine can assess a modality of a study at all (docs/competence.md).

Three layers, each giving reasons from the closed set ``domain.ReasonCode``; a modality with any reason is
not assessable and gives no tumor call, no lesions and no measurements:

1. input (``input_reasons``), before any model runs: the series the role needs exists, its pixels are
   acquired (not DERIVED/SECONDARY, except a plain reformat), it is not a localizer, it has enough slices
   and spans the cervical spine (C2–C7 are about 80–100 mm in an adult: at least ``MIN_COVERAGE_MM``);
2. anatomy (``anatomy_reasons``), on the segmentation: a column of at least ``MIN_BODIES`` vertebral bodies
   of plausible size and spacing, discs between them, a canal behind them (CT, MR), levels that can be
   named (C2 … C7 counted from the discs, or the radiograph's own C2 … C7 labels in order);
3. distribution (``CompetenceReference.ood``): the segmentation model's pooled encoder features of the
   series' slices against those of its training images, as a Mahalanobis distance; the threshold is
   calibrated on held-out SYNTHETIC phantom studies to a stated in-domain pass rate
   (``cspine calibrate --competence-only``, ``model_repository/competence.json``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from cspine.analysis.levels import SpineFrame
from cspine.analysis.masks import component_sizes, components
from cspine.dicom.selection import LOCALIZER_TYPES, image_type, is_derived, mr_weighting
from cspine.domain import (
    MEASURED_LEVELS,
    Assessment,
    Disclosure,
    Lesion,
    Modality,
    ModalityResult,
    Notice,
    NoticeCode,
    OodScore,
    Reason,
    ReasonCode,
    Selection,
    Series,
    SeriesRole,
    SeriesUsed,
    Study,
    Volume,
)
from cspine.inference.model_config import served_model_file, version_file
from cspine.inference.specs import MODALITY_ORDER, SEG_LABELS, SEG_MODEL_NAMES

COMPETENCE_FILE = "competence.json"

# The series each modality segments, the one its measurements are made on first.
SEG_ROLES: dict[Modality, tuple[SeriesRole, ...]] = {
    Modality.CT: (SeriesRole.CT,),
    Modality.MR: (SeriesRole.MR_T2, SeriesRole.MR_T1),
    Modality.XR: (SeriesRole.XR,),
}

# -- input ---------------------------------------------------------------------------------------------

MIN_SLICES = {Modality.CT: 12, Modality.MR: 5}
# Extent along the spine (CT: across its slices; MR and radiograph: in the image plane, head to foot).
MIN_COVERAGE_MM = 60.0


def _superior_extent_mm(volume: Volume) -> float:
    """How far the images reach head to foot (patient z) in mm, whatever their plane."""
    k, r, c = volume.shape
    corners = np.array([[a, b, d] for a in (0, k - 1) for b in (0, r - 1) for d in (0, c - 1)], dtype=float)
    z = volume.index_to_patient(corners)[:, 2]
    return float(z.max() - z.min()) + (volume.slice_spacing if volume.slice_direction[2] ** 2 > 0.5 else 0.0)


def series_reasons(modality: Modality, series: Series) -> list[Reason]:
    """Input checks of one chosen series (it has a volume and the role's plane)."""
    volume = series.volume
    assert volume is not None
    reasons = []
    kind = "/".join(image_type(series))
    if is_derived(series):
        code = ReasonCode.LOCALIZER if LOCALIZER_TYPES & set(image_type(series)) else ReasonCode.DERIVED_IMAGE
        what = "a localizer" if code is ReasonCode.LOCALIZER else "derived images, not acquired pixels"
        reasons.append(Reason(code, f"{modality.value}: the series holds {what} (ImageType {kind})"))
    needed = MIN_SLICES.get(modality)
    if needed is not None and volume.shape[0] < needed:
        reasons.append(
            Reason(
                ReasonCode.TOO_FEW_SLICES,
                f"{modality.value}: {volume.shape[0]} slice(s); at least {needed} are needed for a volume",
            )
        )
    extent = _superior_extent_mm(volume)
    if extent < MIN_COVERAGE_MM:
        reasons.append(
            Reason(
                ReasonCode.INSUFFICIENT_COVERAGE,
                f"{modality.value}: the images span {extent:.0f} mm head to foot; C2–C7 need at least "
                f"{MIN_COVERAGE_MM:.0f} mm",
            )
        )
    return reasons


def _unusable_reason(modality: Modality, series: Series, why: str) -> Reason:
    """Why a series of this modality could not fill a role, as a reason (``why``: selection's words)."""
    if series.volume is None:
        code = ReasonCode.UNSUPPORTED_PIXELS
    elif modality is Modality.MR and mr_weighting(series)[0] is None:
        code = ReasonCode.UNKNOWN_WEIGHTING
    else:
        code = ReasonCode.WRONG_ORIENTATION
    return Reason(code, why)


@dataclass(frozen=True)
class InputVerdict:
    """The input layer's verdict on one modality of a study: the roles to analyse, or why none."""

    modality: Modality
    roles: tuple[SeriesRole, ...]  # chosen roles whose series passed the input checks
    judged: tuple[tuple[SeriesRole, Series], ...]  # the chosen series, passed or not (the result names them)
    reasons: tuple[Reason, ...]  # why not assessable, when no role passed

    @property
    def assessable(self) -> bool:
        return bool(self.roles)

    def volumes(self) -> dict[SeriesRole, Volume]:
        """The volumes of the roles to analyse, in their order."""
        out = {}
        for role, series in self.judged:
            if role in self.roles:
                assert series.volume is not None  # select_series chooses only a series with a volume
                out[role] = series.volume
        return out


def input_verdicts(study: Study, selection: Selection) -> dict[Modality, InputVerdict]:
    """One verdict per modality the study holds images of (CT, MR, radiograph)."""
    skipped = {n.series_instance_uid: n.message for n in selection.notices if n.code is NoticeCode.SERIES_SKIPPED}
    out = {}
    for modality in MODALITY_ORDER:
        present = [s for s in study.series if s.modality is modality]
        if not present:
            continue
        judged = tuple((r, selection.chosen[r]) for r in SEG_ROLES[modality] if r in selection.chosen)
        roles, reasons = [], []
        for role, series in judged:
            found = series_reasons(modality, series)
            reasons.extend(found)
            if not found:
                roles.append(role)
        if not judged:
            reasons = [_unusable_reason(modality, s, skipped.get(s.series_instance_uid, "")) for s in present]
        unique = tuple({r.code: r for r in reasons}.values()) if not roles else ()
        out[modality] = InputVerdict(modality, tuple(roles), judged, unique)
    return out


def not_assessable_result(
    verdict: InputVerdict, ood: OodScore | None = None, reasons: tuple[Reason, ...] | None = None
) -> ModalityResult:
    """A modality that gives no tumor call: the series it was judged on and why (``reasons``, else the input
    verdict's), nothing else."""
    series = tuple(_used(role, s) for role, s in verdict.judged)
    return ModalityResult(verdict.modality, series, [], Assessment.not_assessable(reasons or verdict.reasons), ood=ood)


def assessed_result(
    verdict: InputVerdict,
    lesions: list[Lesion],
    assessment: Assessment,
    labels: Mapping[SeriesRole, np.ndarray],
    ood: OodScore | None,
) -> ModalityResult:
    """A modality that passed every layer: the series it was analysed on (the roles that passed the input
    checks), its lesions, its assessment and its label maps on each source series."""
    series = tuple(_used(role, s) for role, s in verdict.judged if role in verdict.roles)
    return ModalityResult(verdict.modality, series, lesions, assessment, labels, ood)


def _used(role: SeriesRole, series: Series) -> SeriesUsed:
    slices = series.volume.shape[0] if series.volume is not None else 0
    return SeriesUsed(role, series.series_instance_uid, series.description, slices)


def not_assessable_notices(results: Mapping[Modality, ModalityResult]) -> list[Notice]:
    """A notice per modality of the results that was not assessed, saying why."""
    return [
        Notice(NoticeCode.NOT_ASSESSABLE, r.assessment.status_message)
        for r in results.values()
        if not r.assessment.assessed
    ]


def no_assessable_modality(results: Mapping[Modality, ModalityResult]) -> Reason:
    """Why a study gets no fused assessment: no modality it holds could be assessed, each for its reasons."""
    if not results:
        what = "the study holds no CT, MR or radiograph image cspine reads"
    else:
        what = "; ".join(
            f"{m.value}: " + ", ".join(r.code.value for r in res.assessment.reasons) for m, res in results.items()
        )
    return Reason(ReasonCode.NO_ASSESSABLE_MODALITY, f"no modality of the study could be assessed ({what})")


# -- anatomy -------------------------------------------------------------------------------------------

MIN_BODIES = 4  # a cervical column shows at least four bodies (C2 … C7 are six)
BODY_ML = (0.3, 15.0)  # plausible volume of one vertebral body's segment per level (adult C3–C7 about 3–8 mL)
BODY_WIDTH_MM = 50.0  # largest extent across the column of one body's segment (a body is 15–25 mm wide)
LEVEL_MM = 16.0  # one level along the column (body and disc): bodies fused across a lost disc count per level
BODY_GAP_MM = (-3.0, 20.0)  # space between neighbouring bodies along the column (the disc)
BODY_SHIFT_MM = 20.0  # largest sideways step between neighbours (a column, not a scatter)
BODY_MM2 = (30.0, 2500.0)  # one body's area on a lateral radiograph
BODY_STEP_MM = (8.0, 35.0)  # distance between neighbouring body centres on a radiograph, per level
MIN_DISCS = 2
CANAL_BEHIND_MM = (3.0, 45.0)  # canal centre behind the bodies' centre (patient +y)


@dataclass(frozen=True)
class _Parts:
    """The connected parts of a mask, superior first: centres, sizes and patient-axis boxes."""

    centres: np.ndarray  # (N, 3) patient mm
    sizes: np.ndarray  # mL (3D) or mm² (radiograph)
    low: np.ndarray  # (N, 3) lower corner of the part's box, patient mm
    high: np.ndarray  # (N, 3) upper corner


def _parts(mask: np.ndarray, volume: Volume) -> _Parts:
    labels, count = components(mask)
    sizes = component_sizes(labels, count) if count else np.zeros(0, dtype=int)
    keep = np.nonzero(sizes >= 4)[0] + 1
    if not len(keep):
        return _Parts(*(np.empty((0, 3)), np.empty(0), np.empty((0, 3)), np.empty((0, 3))))
    index = np.argwhere(np.isin(labels, keep))
    which = labels[tuple(index.T)]
    sums = np.zeros((count + 1, 3))
    np.add.at(sums, which, index)
    centres = volume.index_to_patient(sums[keep] / sizes[keep - 1, None])
    boxes = ndimage.find_objects(labels)
    corners = [
        volume.index_to_patient(
            np.array(
                [[a, b, c] for a in (k.start, k.stop - 1) for b in (i.start, i.stop - 1) for c in (j.start, j.stop - 1)]
            )
        )
        for k, i, j in (boxes[n - 1] for n in keep)
    ]
    k, r, c = volume.spacing
    unit = r * c if volume.projection else k * r * c / 1000.0  # mm² per pixel, mL per voxel
    order = np.argsort(-centres[:, 2])
    return _Parts(
        centres[order],
        sizes[keep - 1][order] * unit,
        np.array([p.min(axis=0) for p in corners])[order],
        np.array([p.max(axis=0) for p in corners])[order],
    )


def _column(parts: _Parts) -> tuple[np.ndarray, int]:
    """The longest run of plausible bodies stacked like a spine: their centres (superior first) and how many
    bodies it holds (a part spanning several levels — bodies fused across a lost disc — counts per level)."""
    height = parts.high[:, 2] - parts.low[:, 2]
    levels = np.maximum(1, np.round(height / LEVEL_MM)).astype(int)
    width = np.max(parts.high[:, :2] - parts.low[:, :2], axis=1)
    per_level = parts.sizes / levels
    plausible = np.nonzero((per_level >= BODY_ML[0]) & (per_level <= BODY_ML[1]) & (width <= BODY_WIDTH_MM))[0]
    best: list[int] = []
    run: list[int] = []
    for i in plausible:
        if run:
            upper = run[-1]
            gap = parts.low[upper, 2] - parts.high[i, 2]
            sideways = float(np.hypot(*(parts.centres[upper, :2] - parts.centres[i, :2])))
            if not (BODY_GAP_MM[0] <= gap <= BODY_GAP_MM[1] and sideways <= BODY_SHIFT_MM):
                best = max(best, run, key=lambda r: levels[r].sum())
                run = []
        run.append(i)
    best = max(best, run, key=lambda r: levels[r].sum())
    return parts.centres[best].reshape(-1, 3), int(levels[best].sum())


def _radiograph_reasons(labels: np.ndarray, volume: Volume) -> list[Reason]:
    """The radiograph model names C2 … C7 itself: enough of them of plausible area, in order head to foot,
    each a plausible step below the one above."""
    names = SEG_LABELS[Modality.XR]
    found = []  # (level number, centre) of the largest part of each body label, when plausible
    for n in range(2, 8):
        parts = _parts(labels == names.index(f"c{n}_body"), volume)
        if len(parts.sizes) and BODY_MM2[0] <= parts.sizes.max() <= BODY_MM2[1]:
            found.append((n, parts.centres[int(np.argmax(parts.sizes))]))
    reasons = []
    if len(found) < MIN_BODIES:
        reasons.append(
            Reason(
                ReasonCode.NO_VERTEBRAL_COLUMN,
                f"XR: {len(found)} of the C2–C7 bodies found with a plausible size; at least {MIN_BODIES} are needed",
            )
        )
    for (upper, a), (lower, b) in zip(found, found[1:], strict=False):
        step = float(np.linalg.norm(a - b)) / (lower - upper)
        if a[2] <= b[2] or not BODY_STEP_MM[0] <= step <= BODY_STEP_MM[1]:
            reasons.append(
                Reason(
                    ReasonCode.LEVELS_UNASSIGNABLE,
                    f"XR: the bodies labelled C{upper} and C{lower} are not stacked like a spine",
                )
            )
            break
    if not (labels == names.index("disc")).any():
        reasons.append(Reason(ReasonCode.NO_DISCS, "XR: no intervertebral disc was found"))
    return reasons


def anatomy_reasons(modality: Modality, labels: np.ndarray, volume: Volume, levels_named: int) -> list[Reason]:
    """Plausibility of the segmented spine; ``levels_named``: how many of C2 … C7 the level frame named."""
    names = SEG_LABELS[modality]
    m = modality.value
    if modality is Modality.XR:
        return _radiograph_reasons(labels, volume)

    column, bodies = _column(_parts(labels == names.index("vertebral_body"), volume))
    reasons = []
    if bodies < MIN_BODIES:
        reasons.append(
            Reason(
                ReasonCode.NO_VERTEBRAL_COLUMN,
                f"{m}: {bodies} vertebral bodies of plausible size found in a column; at least {MIN_BODIES} are needed",
            )
        )
    discs = _parts(labels == names.index("disc"), volume).centres
    if len(column) >= 2:
        top, bottom = column[0][2], column[-1][2]
        discs = discs[(discs[:, 2] < top) & (discs[:, 2] > bottom)]
    if len(discs) < MIN_DISCS:
        reasons.append(
            Reason(
                ReasonCode.NO_DISCS,
                f"{m}: {len(discs)} discs found between the bodies; at least {MIN_DISCS} are needed",
            )
        )
    canal_values = [names.index(n) for n in ("canal", "csf", "cord") if n in names]
    canal = np.isin(labels, canal_values)
    if len(column):
        behind = None
        if canal.any():
            centre = volume.index_to_patient(np.argwhere(canal).mean(axis=0)[None])[0]
            behind = float(centre[1] - column[:, 1].mean())
        if behind is None or not (CANAL_BEHIND_MM[0] <= behind <= CANAL_BEHIND_MM[1]):
            reasons.append(Reason(ReasonCode.NO_CANAL, f"{m}: no spinal canal was found behind the vertebral bodies"))
    if levels_named < MIN_BODIES and not reasons:
        reasons.append(
            Reason(
                ReasonCode.LEVELS_UNASSIGNABLE,
                f"{m}: only {levels_named} of the levels C2–C7 could be named from the discs",
            )
        )
    return reasons


def segmentation_reasons(
    modality: Modality, labels: np.ndarray, volume: Volume, frame: SpineFrame | None, ood: OodScore | None
) -> list[Reason]:
    """The anatomy and distribution layers' reasons on one segmentation: ``labels`` on ``volume``'s grid, the
    level ``frame`` named from them, and the features' ``ood`` score (None without a reference)."""
    named = sum(1 for n in MEASURED_LEVELS if frame is not None and n in frame.levels)
    return anatomy_reasons(modality, labels, volume, named) + distribution_reasons(modality, ood)


# -- distribution -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureReference:
    """The training images' pooled encoder features of one segmentation model: their mean, a whitening
    matrix (inverse square root of the shrunk covariance), and the calibrated threshold on the score."""

    mean: np.ndarray  # (D,)
    whiten: np.ndarray  # (D, D)
    threshold: float
    pass_rate: float  # the in-domain pass rate the threshold was calibrated to
    fitted_on: str

    def score(self, features: np.ndarray) -> float:
        """Root mean squared Mahalanobis distance per feature of a series' slices (about 1 in domain)."""
        z = (np.asarray(features, dtype=np.float64).reshape(-1, len(self.mean)) - self.mean) @ self.whiten
        return float(np.sqrt(np.mean(np.sum(z * z, axis=1)) / len(self.mean)))

    def ood(self, features: np.ndarray) -> OodScore:
        return OodScore(round(self.score(features), 4), round(self.threshold, 4))


def distribution_reasons(modality: Modality, ood: OodScore | None) -> list[Reason]:
    """The distribution layer's verdict: a reason when the images score above the threshold; none without a
    score (no reference for the model)."""
    if ood is None or ood.score <= ood.threshold:
        return []
    return [
        Reason(
            ReasonCode.OUT_OF_DISTRIBUTION,
            f"{modality.value}: the images are unlike the models' training data (score {ood.score:.2f}, "
            f"threshold {ood.threshold:.2f})",
        )
    ]


def whitening(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and inverse square root of the Ledoit–Wolf shrunk covariance of ``features`` (N, D)."""
    from sklearn.covariance import LedoitWolf

    covariance = LedoitWolf().fit(features).covariance_
    values, vectors = np.linalg.eigh(covariance)
    values = np.maximum(values, 1e-6 * values.max())
    return features.mean(axis=0), vectors @ np.diag(values**-0.5) @ vectors.T


def lognormal_threshold(scores: Sequence[float], pass_rate: float) -> float:
    """The ``pass_rate`` quantile of a log-normal fitted to in-domain scores."""
    from scipy.stats import norm

    logs = np.log(np.asarray(scores, dtype=np.float64))
    return float(np.exp(logs.mean() + norm.ppf(pass_rate) * logs.std(ddof=1)))


@dataclass(frozen=True)
class CompetenceReference:
    """What ``model_repository/competence.json`` holds (and ``competence.npz`` beside it, the feature means and
    whitening matrices): the disclosure and one feature reference per segmentation model, with the SHA-256 of
    the model it was fitted on (a re-trained model needs a new fit)."""

    disclosure: Disclosure
    references: dict[Modality, FeatureReference]
    model_sha256: dict[Modality, str]

    def ood(self, modality: Modality, features: np.ndarray) -> OodScore | None:
        reference = self.references.get(modality)
        return reference.ood(features) if reference is not None else None

    def save(self, repository: Path, version: int | None = None) -> Path:
        """Write the reference of version set ``version`` (default: the served one)."""
        path = version_file(repository, COMPETENCE_FILE, version)
        data = {
            "trained_on": self.disclosure.trained_on,
            "intended_use": self.disclosure.intended_use,
            "models": {
                m.value: {
                    "model": SEG_MODEL_NAMES[m],
                    "sha256": self.model_sha256[m],
                    "threshold": r.threshold,
                    "pass_rate": r.pass_rate,
                    "fitted_on": r.fitted_on,
                }
                for m, r in self.references.items()
            },
        }
        path.write_text(json.dumps(data, indent=1) + "\n")
        arrays = {
            f"{m.value}_{name}": getattr(r, name) for m, r in self.references.items() for name in ("mean", "whiten")
        }
        np.savez_compressed(path.with_suffix(".npz"), **arrays)
        return path

    @classmethod
    def load(cls, repository: Path) -> CompetenceReference:
        """The reference of the repository's served version set (model_config.version_file)."""
        path = version_file(repository, COMPETENCE_FILE)
        data = json.loads(path.read_text())
        models = {Modality(k): v for k, v in data["models"].items()}
        with np.load(path.with_suffix(".npz")) as arrays:
            references = {
                m: FeatureReference(
                    arrays[f"{m.value}_mean"],
                    arrays[f"{m.value}_whiten"],
                    v["threshold"],
                    v["pass_rate"],
                    v["fitted_on"],
                )
                for m, v in models.items()
            }
        return cls(
            Disclosure(data["trained_on"], data["intended_use"]),
            references,
            {m: v["sha256"] for m, v in models.items()},
        )


def model_sha256(repository: Path, modality: Modality) -> str:
    return hashlib.sha256(served_model_file(repository, SEG_MODEL_NAMES[modality]).read_bytes()).hexdigest()
