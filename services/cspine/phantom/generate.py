"""Generate SYNTHETIC cervical spine studies: DICOM per modality, ``truth.json`` and ``labels.npz`` per case.

A cohort folder holds one folder per case plus ``cohort.json``; training, evaluation and load tests read
it. The same (seed, case index) always gives the same case, whatever modalities are asked for.

``--tumor random`` draws no tumor for 25 % of cases and otherwise a subtype with the relative
frequencies of ``tumors.SUBTYPES`` (hemangioma 14, osteoid osteoma 8, schwannoma 10, osteochondroma 6,
giant cell tumor 10, aneurysmal bone cyst 8, osteoblastoma 7, metastasis 18, myeloma 10, chordoma 9).

``--site NAME`` (``sites.SITES``) shifts scanner, protocol and population away from this default; a case is
first planned (anatomy, lesion, patient: ``plan_case``, no image) and then rendered (``render_case``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

import cspine
from cspine.domain import SeriesRole
from cspine.phantom.anatomy import LEVELS, Label, Spine, sample_spine
from cspine.phantom.scanner import (
    MATRICES,
    RenderedSeries,
    Roi,
    Scene,
    Shift,
    acquire_ct,
    acquire_mr,
    acquire_xr,
)
from cspine.phantom.sites import DEFAULT_OPLL, DEFAULT_SITE, DEFAULT_TUMOR_FREE_SHARE, Population, get_site
from cspine.phantom.truth import spine_truth, tumor_truth
from cspine.phantom.tumors import (
    SUBTYPES,
    TumorClass,
    TumorPlan,
    TumorSubtype,
    place_tumor,
    plan_tumor,
    subtypes_of,
)
from cspine.phantom.writer import CT_STORAGE, StudyInfo, write_ct, write_mr, write_xr

logger = logging.getLogger(__name__)

MODALITIES = ("ct", "mr", "xr")
TUMOR_FREE_SHARE = DEFAULT_TUMOR_FREE_SHARE
DIFFICULTIES = {"easy": 0.2, "normal": 0.5, "hard": 0.8}
OPLL_PROBABILITY = {"random": DEFAULT_OPLL, "yes": 1.0, "no": 0.0}
MIN_LESION_ML = 0.05
TRUTH_FILE = "truth.json"
REFERENCE_FILE = "reference.json"  # the cohort format `cspine evaluate study` reads (docs/evaluation.md)
LABELS_FILE = "labels.npz"
COHORT_FILE = "cohort.json"


def parse_difficulty(text: str | float) -> float:
    """``easy`` (0.2), ``normal`` (0.5), ``hard`` (0.8) or a number in [0, 1]."""
    if isinstance(text, str) and text in DIFFICULTIES:
        return DIFFICULTIES[text]
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"difficulty must be easy, normal, hard or a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {value}")
    return value


def tumor_choices() -> list[str]:
    return ["random", "none", *(c.value for c in TumorClass), *(s.value for s in TumorSubtype)]


@dataclass(frozen=True)
class PhantomOptions:
    modalities: tuple[str, ...] = MODALITIES
    tumor: str = "random"  # random | none | a class | a subtype
    difficulty: float = 0.5
    shift: Shift = field(default_factory=Shift)
    opll: str = "random"  # random (12 % of cases) | yes | no
    matrix: str = "phantom"  # phantom (256² CT/MR, ~0.55 mm radiograph) | real (scanner.MATRICES)
    site: str = DEFAULT_SITE  # a name of sites.SITES: scanner, protocol and population

    def __post_init__(self) -> None:
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown or not self.modalities:
            raise ValueError(f"modalities must be a non-empty subset of {','.join(MODALITIES)}, got {self.modalities}")
        if self.tumor not in tumor_choices():
            raise ValueError(f"tumor must be one of {', '.join(tumor_choices())}; got {self.tumor!r}")
        parse_difficulty(self.difficulty)
        if self.opll not in OPLL_PROBABILITY:
            raise ValueError(f"opll must be one of {', '.join(OPLL_PROBABILITY)}; got {self.opll!r}")
        if self.matrix not in MATRICES:
            raise ValueError(f"matrix must be one of {', '.join(MATRICES)}; got {self.matrix!r}")
        get_site(self.site)  # an unknown site is a ValueError naming the known ones

    def as_dict(self) -> dict:
        return {
            "modalities": list(self.modalities),
            "tumor": self.tumor,
            "difficulty": self.difficulty,
            "shift": self.shift.as_dict(),
            "opll": self.opll,
            # only when not the default, so phantom-size truth.json and cohort.json stay as they were
            **({"matrix": self.matrix} if self.matrix != "phantom" else {}),
            # likewise the site: absent means the default site, whose cases are byte-for-byte as before sites
            **({"site": get_site(self.site).as_dict()} if self.site != DEFAULT_SITE else {}),
        }


def draw_subtype(rng: np.random.Generator, tumor: str, population: Population | None = None) -> TumorSubtype | None:
    """The subtype of a case (None: no tumor); ``population`` (a site's) sets the tumor-free share and mix."""
    population = population or Population()
    if tumor == "none" or (tumor == "random" and rng.random() < population.tumor_free_share):
        return None
    if tumor in {s.value for s in TumorSubtype}:
        return TumorSubtype(tumor)
    pool = subtypes_of(TumorClass(tumor)) if tumor != "random" else list(SUBTYPES)
    weights = np.array([population.subtype_frequency(s) for s in pool])
    return pool[int(rng.choice(len(pool), p=weights / weights.sum()))]


def _describe(series: RenderedSeries, paths: list[Path], case_dir: Path, uid: str) -> dict:
    out = {
        "series_instance_uid": uid,
        "files": [str(p.relative_to(case_dir)) for p in paths],
        "shape": list(series.values.shape),
        "pixel_spacing_mm": [round(float(s), 4) for s in series.pixel_spacing],
        "row_direction": series.row_direction.tolist(),
        "column_direction": series.column_direction.tolist(),
    }
    if series.role is not SeriesRole.XR:
        out.update(
            {
                "origin_mm": [round(float(v), 4) for v in series.origin],
                "slice_spacing_mm": round(series.slice_spacing, 4),
                "slice_thickness_mm": round(series.slice_thickness, 4),
            }
        )
    else:
        out["magnification"] = round(series.acquisition["magnification"], 4)
        out["photometric"] = "MONOCHROME1" if series.acquisition["monochrome1"] else "MONOCHROME2"
    return out


@dataclass
class Case:
    """One SYNTHETIC case in memory: the scene, its rendered series and the lesion's truth."""

    case_id: str
    seed: int
    index: int
    options: PhantomOptions
    scene: Scene
    study: StudyInfo
    lesion: dict | None
    series: dict[SeriesRole, RenderedSeries]
    ct_storage: str
    mr_bits: dict[SeriesRole, int]


@dataclass
class CasePlan:
    """A SYNTHETIC case before any image: scene, lesion truth, patient, and each modality's random stream."""

    case_id: str
    seed: int
    index: int
    options: PhantomOptions
    scene: Scene
    study: StudyInfo
    lesion: dict | None
    streams: dict[str, np.random.SeedSequence]  # "ct", "mr", "xr"


def draw_anatomy(rng: np.random.Generator, options: PhantomOptions) -> tuple[TumorPlan | None, Spine]:
    """The lesion plan (subtype, level, size, collapse; None: no tumor) and the spine of one case, drawn from
    the site's population with the case's anatomy stream: the first draws of ``plan_case``, before the
    lesion is placed."""
    population = get_site(options.site).population
    subtype = draw_subtype(rng, options.tumor, population)
    plan = plan_tumor(rng, subtype, options.difficulty) if subtype else None
    if plan is not None and population.lesion_size != 1.0:
        median, log_sd = plan.spec.diameter_mm
        plan = replace(plan, spec=replace(plan.spec, diameter_mm=(median * population.lesion_size, log_sd)))
    opll = population.opll if options.opll == "random" else OPLL_PROBABILITY[options.opll]
    return plan, sample_spine(rng, plan.collapse if plan else None, opll, population.degeneration)


def draw_study(rng: np.random.Generator, case_id: str, seed: int, index: int, options: PhantomOptions) -> StudyInfo:
    """Patient and study of one case (sex, age from the site's age range, date) from the case's info stream."""
    age_lo, age_hi = get_site(options.site).population.age_years
    return StudyInfo(
        case_id=case_id,
        seed_key=f"cspine-phantom:{seed}:{index}",
        sex=str(rng.choice(["F", "M"])),
        age_years=int(rng.integers(age_lo, age_hi + 1)),
        date=dt.date(2026, 1, 1) + dt.timedelta(days=int(rng.integers(0, 300))),
        site="" if options.site == DEFAULT_SITE else options.site,
    )


def _case_streams(seed: int, index: int) -> list[np.random.SeedSequence]:
    """The anatomy, CT, MR, radiograph and patient streams of case ``index`` of a cohort drawn with ``seed``."""
    return np.random.SeedSequence([seed, index]).spawn(5)


def case_subtype(seed: int, index: int, options: PhantomOptions) -> TumorSubtype | None:
    """The subtype ``plan_case`` will draw for this case (None: tumour-free), from its first draw alone: cheap,
    so a caller can pick cases by their lesion before planning and rendering them."""
    population = get_site(options.site).population
    return draw_subtype(np.random.default_rng(_case_streams(seed, index)[0]), options.tumor, population)


def plan_case(case_id: str, seed: int, index: int, options: PhantomOptions) -> CasePlan:
    """Draw one SYNTHETIC case's anatomy, lesion and patient from the site's population (no rendering)."""
    anatomy_ss, ct_ss, mr_ss, xr_ss, info_ss = _case_streams(seed, index)
    rng = np.random.default_rng(anatomy_ss)
    plan, spine = draw_anatomy(rng, options)
    for _ in range(20):  # a lesion must cover tissue it may grow in; redraw its place if not
        tumor = place_tumor(rng, plan, spine, options.difficulty) if plan else None
        scene = Scene(spine, tumor)
        lesion = tumor_truth(scene)
        if plan is None or (lesion is not None and lesion["volume_ml"] >= MIN_LESION_ML):
            break
    else:
        assert plan is not None  # without a planned lesion the loop breaks on its first pass
        raise RuntimeError(f"could not place a {plan.subtype.value} lesion in case {case_id} (seed {seed})")
    study = draw_study(np.random.default_rng(info_ss), case_id, seed, index, options)
    return CasePlan(case_id, seed, index, options, scene, study, lesion, {"ct": ct_ss, "mr": mr_ss, "xr": xr_ss})


def render_case(plan: CasePlan, roi: Roi | None = None) -> Case:
    """Render a planned case with its site's scanners; with ``roi`` only that window of each series (as the
    lesion bank does: a cheap look at one lesion)."""
    options, scene = plan.options, plan.scene
    site = get_site(options.site)
    scanner = None if site.name == DEFAULT_SITE else site.scanner
    series: dict[SeriesRole, RenderedSeries] = {}
    shift, difficulty, real = options.shift, options.difficulty, options.matrix == "real"
    ct_storage, mr_bits = "", {}
    if "ct" in options.modalities:
        ct_rng = np.random.default_rng(plan.streams["ct"])
        series[SeriesRole.CT] = acquire_ct(scene, ct_rng, shift, difficulty, roi=roi, real=real, scanner=scanner)
        ct_storage = str(ct_rng.choice(list(CT_STORAGE)))
    if "mr" in options.modalities:
        mr_rng = np.random.default_rng(plan.streams["mr"])
        series[SeriesRole.MR_T1], series[SeriesRole.MR_T2] = acquire_mr(
            scene, mr_rng, shift, difficulty, roi=roi, real=real, scanner=scanner
        )
        mr_bits = {role: int(mr_rng.choice([12, 16])) for role in (SeriesRole.MR_T1, SeriesRole.MR_T2)}
    if "xr" in options.modalities:
        xr_rng = np.random.default_rng(plan.streams["xr"])
        series[SeriesRole.XR] = acquire_xr(scene, xr_rng, shift, difficulty, roi=roi, real=real, scanner=scanner)
    return Case(
        plan.case_id, plan.seed, plan.index, options, scene, plan.study, plan.lesion, series, ct_storage, mr_bits
    )


def build_case(case_id: str, seed: int, index: int, options: PhantomOptions) -> Case:
    """Draw and render one SYNTHETIC case. Anatomy and each modality have their own random stream."""
    return render_case(plan_case(case_id, seed, index, options))


_WRITERS = {SeriesRole.CT: "ct", SeriesRole.MR_T1: "mr", SeriesRole.MR_T2: "mr", SeriesRole.XR: "xr"}  # role → folder


def write_case(case: Case, case_dir: Path) -> dict:
    """Write the case's DICOM, labels.npz and truth.json into ``case_dir`` (replaced); returns the truth."""
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    described: dict[str, dict] = {}
    labels: dict[str, np.ndarray] = {}
    for role, rendered in case.series.items():
        folder = case_dir / _WRITERS[role]
        if role is SeriesRole.CT:
            paths = write_ct(rendered, case.study, folder, case.ct_storage)
        elif role is SeriesRole.XR:
            paths = write_xr(rendered, case.study, folder)
        else:
            paths = write_mr(rendered, case.study, folder, case.mr_bits[role])
        described[role.value] = _describe(rendered, paths, case_dir, case.study.uid("series", role.value))
        key = _WRITERS[role]
        labels[f"{key}_labels"], labels[f"{key}_levels"] = rendered.labels, rendered.levels
    if SeriesRole.CT in case.series:
        described["ct"]["storage"] = case.ct_storage
    np.savez_compressed(case_dir / LABELS_FILE, **labels)

    truth = {
        "synthetic": True,
        "note": "SYNTHETIC phantom made by cspine: not patient data",
        "generator": f"cspine {cspine.__version__}",
        "case_id": case.case_id,
        "seed": case.seed,
        "case_index": case.index,
        "study_instance_uid": case.study.study_instance_uid,
        "options": case.options.as_dict(),
        "tumor": case.lesion,
        **spine_truth(case.scene),
        "series": described,
        "label_maps": {
            "file": LABELS_FILE,
            "arrays": {
                "<modality>_labels": "structure label per voxel, uint8 (see 'labels')",
                "<modality>_levels": "vertebral level code per bone, disc or tumor voxel, uint8 (see 'levels')",
            },
            "order": "ct and mr arrays are [slice, row, column] with slices ascending along the slice normal "
            "(row direction x column direction), the order cspine ingest returns; xr arrays are [row, column]",
            "labels": {str(int(lab)): lab.name.lower() for lab in Label},
            "levels": {str(i + 1): name for i, name in enumerate(LEVELS)},
        },
    }
    (case_dir / TRUTH_FILE).write_text(json.dumps(truth, indent=2))
    lesion = case.lesion
    reference = {
        "class": lesion["class"] if lesion else "none",
        "subtype": lesion["subtype"] if lesion else None,
        "level": lesion["primary_level"] if lesion else None,
        "synthetic": True,
    }
    (case_dir / REFERENCE_FILE).write_text(json.dumps(reference, indent=2) + "\n")
    return truth


def generate_case(case_dir: Path, case_id: str, seed: int, index: int, options: PhantomOptions) -> dict:
    """Build and write one SYNTHETIC case; returns its truth (also written as truth.json)."""
    return write_case(build_case(case_id, seed, index, options), case_dir)


def _case_job(args: tuple[Path, str, int, int, PhantomOptions]) -> dict:
    return generate_case(*args)


def generate_cohort(
    out: Path, cases: int, seed: int, options: PhantomOptions, workers: int = 1, progress: bool = True
) -> list[dict]:
    """Write ``cases`` SYNTHETIC cases into ``out`` (one folder each) and ``out/cohort.json``."""
    if cases < 1:
        raise ValueError(f"cases must be at least 1, got {cases}")
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out / f"case-{i + 1:04d}", f"case-{i + 1:04d}", seed, i, options) for i in range(cases)]
    bar = tqdm(total=cases, desc="phantom", unit="case", disable=not progress)
    truths: Iterable[dict]
    try:
        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                truths = []
                for truth in pool.map(_case_job, jobs):
                    truths.append(truth)
                    bar.update()
        else:
            truths = []
            for job in jobs:
                truths.append(_case_job(job))
                bar.update()
    finally:
        bar.close()
    manifest = {
        "synthetic": True,
        "note": "SYNTHETIC cohort made by cspine phantom: not patient data",
        "generator": f"cspine {cspine.__version__}",
        "seed": seed,
        "options": options.as_dict(),
        "cases": [
            {
                "case_id": t["case_id"],
                "class": t["tumor"]["class"] if t["tumor"] else "none",
                "subtype": t["tumor"]["subtype"] if t["tumor"] else None,
                "primary_level": t["tumor"]["primary_level"] if t["tumor"] else None,
            }
            for t in truths
        ],
    }
    (out / COHORT_FILE).write_text(json.dumps(manifest, indent=2))
    return list(truths)
