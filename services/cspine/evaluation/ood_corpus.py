"""Out-of-domain corpora for cspine's competence checks: studies cspine must refuse to make tumor calls on.

Two corpora, each a list of :class:`CorpusStudy` (one study as a hospital would send it, and the reason code
from ``domain.ReasonCode`` cspine is expected to give among its reasons):

* ``real_ood_studies(workdir)``: REAL DICOM files that ship inside installable packages — pydicom's own
  test files, ``pydicom-data`` and ``deid-data`` (both in the ``dev`` extra). Head, neck, thoracic spine,
  abdomen and brain-perfusion CT, head/shoulder/abdomen MR, chest and leg radiographs, 16×16 thumbnails of a
  cervical spine radiograph study, an animal's lateral thorax radiograph, ultrasound, a bone scan and a
  colour secondary capture. Nothing is copied into the repository; ``tests/data/real_ood/README.md`` is the
  table of every file. Pixels are never changed: one study is a copy whose header is relabelled (the cat's
  thorax radiograph says ViewPosition AP; the copy says LL, so it reaches the checks made on the image).
* ``synthetic_ood_studies(workdir, seed)``: SYNTHETIC studies written by the phantom's renderer and writer
  (patient SYNTHETIC^OOD-…, series descriptions starting with SYNTHETIC): a neck without a spine (CT, MR,
  lateral radiograph: soft tissue and airway only), a head-like CT (skull shell, brain-like tissue, no
  neck) and a cervical spine CT of one to three slices. Each study folder holds ``truth.json`` and
  ``labels.npz`` beside the DICOM, like a phantom case.

``expected`` is the reason code that should be among the reasons the study (or its modality) is not
assessable; a competence evaluation counts a study as refused when no tumor call is made, whatever the
reasons, and reports separately whether the expected one was given.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import importlib.util
import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

import cspine
from cspine.domain import ReasonCode, SeriesRole
from cspine.errors import CspineError
from cspine.phantom.anatomy import Label, Tissue, sample_spine
from cspine.phantom.geometry import Canvas
from cspine.phantom.scanner import RenderedSeries, Scene, Shift, acquire_ct, acquire_mr, acquire_xr
from cspine.phantom.writer import CT_STORAGE, SYNTHETIC_NOTE, StudyInfo, write_ct, write_mr, write_xr

__all__ = [
    "LABELS_FILE",
    "TRUTH_FILE",
    "CorpusPackageMissingError",
    "CorpusStudy",
    "real_ood_studies",
    "synthetic_ood_studies",
]

TRUTH_FILE = "truth.json"
LABELS_FILE = "labels.npz"


class CorpusPackageMissingError(CspineError):
    """A package the real out-of-domain corpus reads its files from is not installed (or lacks a file)."""


@dataclass(frozen=True)
class CorpusStudy:
    """One out-of-domain study: every file of it, where it came from and what cspine should say."""

    name: str
    source: str  # "package==version: path-inside-package[, …]", or "SYNTHETIC cspine phantom …"
    description: str  # what the images show
    expected: str  # a domain.ReasonCode value that should be among the reasons it is not assessable
    files: tuple[Path, ...]


# --------------------------------------------------------------------------------------------------------
# Real files from installed packages


@dataclass(frozen=True)
class _Real:
    name: str
    distribution: str  # the package's name on PyPI
    module: str  # the importable package whose folder holds the files
    paths: tuple[str, ...]  # inside that folder
    description: str
    expected: ReasonCode
    relabel: Mapping[str, object] = field(default_factory=dict)  # header changes of a copy; pixels untouched


_TEST_FILES = "data/test_files"
_DICOMDIR = f"{_TEST_FILES}/dicomdirtests/77654033"

_REAL: tuple[_Real, ...] = (
    _Real(
        "ct-head-skull-base-slice",
        "pydicom",
        "pydicom",
        (f"{_TEST_FILES}/J2K_pixelrep_mismatch.dcm",),
        "one axial CT slice of a head at the skull base (BodyPartExamined HEAD), 512², JPEG 2000",
        ReasonCode.TOO_FEW_SLICES,
    ),
    _Real(
        "ct-head-vertex-slice",
        "pydicom-data",
        "data_store",
        ("data/693_UNCR.dcm",),
        "one axial CT slice of a head above the skull base (skull and brain), 512², '5/5mm Plain'",
        ReasonCode.TOO_FEW_SLICES,
    ),
    _Real(
        "ct-neck-slice",
        "pydicom-data",
        "data_store",
        ("data/bad_sequence.dcm",),
        "one axial CT slice, zoomed on a vertebra with rib heads (thoracic-looking) though the header says "
        "BodyPartExamined NECK, 512² at 0.29 mm",
        ReasonCode.TOO_FEW_SLICES,
    ),
    _Real(
        "ct-thoracic-spine-slice",
        "pydicom",
        "pydicom",
        (f"{_TEST_FILES}/CT_small.dcm",),
        "one axial CT slice through a thoracic vertebra with the aorta and a rib, 128²",
        ReasonCode.TOO_FEW_SLICES,
    ),
    _Real(
        "ct-abdomen-slice",
        "pydicom-data",
        "data_store",
        ("data/explicit_VR-UN.dcm",),
        "one axial CT slice of the upper abdomen (series 'Pancreas'), 512², no slice thickness",
        ReasonCode.TOO_FEW_SLICES,
    ),
    _Real(
        "ct-head-thumbnails",
        "pydicom",
        "pydicom",
        tuple(f"{_DICOMDIR}/CT2/{n}" for n in ("17106", "17136", "17166", "17196")),
        "four 16×16 thumbnails of a routine brain CT ('CT, HEAD/BRAIN WO CONTRAST'), 200 mm apart",
        ReasonCode.TOO_FEW_SLICES,
    ),
    _Real(
        "ct-brain-perfusion-map",
        "pydicom-data",
        "data_store",
        ("data/eCT_Supplemental.dcm",),
        "enhanced CT of a brain perfusion map (ImageType DERIVED/PRIMARY/PERFUSION/RCBF), 2 frames of 512²",
        ReasonCode.DERIVED_IMAGE,
    ),
    _Real(
        "mr-head-enhanced",
        "pydicom-data",
        "data_store",
        ("data/emri_small.dcm",),
        "enhanced MR of a head (BodyPartExamined HEAD, T1), 10 frames of 64², no usable plane for ingest",
        ReasonCode.UNSUPPORTED_PIXELS,
    ),
    _Real(
        "mr-shoulder-slice",
        "pydicom-data",
        "data_store",
        ("data/MR2_UNCR.dcm",),
        "one oblique coronal T1 spin-echo MR slice of a shoulder, 1024²",
        ReasonCode.WRONG_ORIENTATION,
    ),
    _Real(
        "mr-abdomen-mpr",
        "pydicom",
        "pydicom",
        (f"{_TEST_FILES}/examples_overlay.dcm",),
        "one axial MR reformat (DERIVED/SECONDARY/MPR) of the upper abdomen with a liver lesion, 300×484",
        ReasonCode.WRONG_ORIENTATION,
    ),
    _Real(
        "cr-chest-pa",
        "pydicom-data",
        "data_store",
        ("data/RG1_UNCR.dcm",),
        "a PA chest radiograph (CR, ViewPosition PA), 1955×1841, no pixel spacing in the header",
        ReasonCode.UNSUPPORTED_PIXELS,
    ),
    _Real(
        "cr-leg-ap",
        "pydicom-data",
        "data_store",
        ("data/RG3_UNCR.dcm",),
        "an AP radiograph of the distal lower leg and ankle (CR, 'Non-ossifying fibroma of distal tibia'), "
        "1760², no pixel spacing in the header",
        ReasonCode.UNSUPPORTED_PIXELS,
    ),
    _Real(
        "cr-cspine-thumbnails",
        "pydicom",
        "pydicom",
        tuple(f"{_DICOMDIR}/{s}" for s in ("CR1/6154", "CR2/6247", "CR3/6278")),
        "a cervical spine radiograph study ('XR C Spine Comp Min 4 Views': lateral and two obliques) kept "
        "only as 16×16 thumbnails of 0.1 mm pixels (1.6 mm across), ImageType DERIVED",
        ReasonCode.INSUFFICIENT_COVERAGE,
    ),
    _Real(
        "dx-cat-thorax",
        "deid-data",
        "deid_data",
        ("data/animals/cat.dcm",),
        "a lateral radiograph of a cat's thorax and abdomen (DX, 'Thorax LAT'; the header says ViewPosition "
        "AP), 2614×3072",
        ReasonCode.WRONG_ORIENTATION,
    ),
    _Real(
        "dx-cat-thorax-as-lateral",
        "deid-data",
        "deid_data",
        ("data/animals/cat.dcm",),
        "the cat's thorax radiograph, a copy relabelled as a lateral view (ViewPosition LL, PatientOrientation "
        "F\\A, new UIDs); pixels unchanged",
        ReasonCode.OUT_OF_DISTRIBUTION,
        {"ViewPosition": "LL", "PatientOrientation": ["F", "A"]},
    ),
    _Real(
        "sc-ct-brain-drawing",
        "deid-data",
        "deid_data",
        ("data/humans/ctbrain1.dcm", "data/humans/ctbrain2.dcm"),
        "two secondary captures with a CT head header ('CT BRAIN WO IVCON') whose pixels are a drawn face in "
        "colour (YBR_FULL_422 JPEG); both files carry the same SOPInstanceUID",
        ReasonCode.UNSUPPORTED_PIXELS,
    ),
    _Real(
        "us-lymph-node",
        "pydicom-data",
        "data_store",
        ("data/US1_UNCR.dcm",),
        "a colour Doppler ultrasound image of a lymph node (US, RGB), 480×640",
        ReasonCode.NO_ASSESSABLE_MODALITY,
    ),
    _Real(
        "nm-bone-scan",
        "pydicom-data",
        "data_store",
        ("data/JPEG2000_UNC.dcm",),
        "a whole-body bone scintigram (NM stored as secondary capture, 'Whole Body Bone'), 1024×256",
        ReasonCode.NO_ASSESSABLE_MODALITY,
    ),
)


def _package(distribution: str, module: str) -> tuple[str, Path]:
    """(installed version, folder of the importable package), or CorpusPackageMissingError."""
    hint = f"install it with `pip install {distribution}` (it is in cspine's dev extra: pip install -e '.[dev]')"
    try:
        version = importlib.metadata.version(distribution)
        spec = importlib.util.find_spec(module)
    except importlib.metadata.PackageNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CorpusPackageMissingError(f"the real out-of-domain corpus needs the package {distribution}: {hint}")
    return version, Path(next(iter(spec.submodule_search_locations)))


def _relabelled_copy(source: Path, target: Path, name: str, changes: Mapping[str, object]) -> Path:
    """A copy of ``source`` with header ``changes`` and new UIDs (derived from the old ones); pixel bytes kept."""
    ds = pydicom.dcmread(source)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, keyword, generate_uid(entropy_srcs=[str(getattr(ds, keyword)), "cspine-ood-relabel", name]))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.ImageComments = "cspine out-of-domain corpus: header relabelled (" + ", ".join(changes) + "); pixels unchanged"
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return target


def real_ood_studies(workdir: Path) -> list[CorpusStudy]:
    """The REAL out-of-domain studies, read from the installed packages; relabelled copies go to ``workdir``.

    Raises CorpusPackageMissingError naming the package when one is not installed or lacks a file."""
    workdir = Path(workdir)
    studies = []
    for entry in _REAL:
        version, folder = _package(entry.distribution, entry.module)
        files = []
        for inside in entry.paths:
            path = folder / inside
            if not path.is_file():
                raise CorpusPackageMissingError(
                    f"{entry.distribution}=={version} has no {entry.module}/{inside} (study {entry.name}); "
                    f"the corpus was made with the versions in tests/data/real_ood/README.md"
                )
            if entry.relabel:
                path = _relabelled_copy(path, workdir / entry.name / path.name, entry.name, entry.relabel)
            files.append(path)
        source = f"{entry.distribution}=={version}: " + ", ".join(f"{entry.module}/{p}" for p in entry.paths)
        studies.append(CorpusStudy(entry.name, source, entry.description, entry.expected.value, tuple(files)))
    return studies


# --------------------------------------------------------------------------------------------------------
# SYNTHETIC studies from the phantom


class _NeckWithoutSpine(Scene):
    """The phantom's neck (fat, muscle, airway, shoulders) with nothing inside: no vertebrae, discs, canal,
    cord or lesion."""

    def paint_inner(self, canvas: Canvas) -> None:
        return None


# Head-like ellipsoid, half axes (left–right, antero-posterior, head–foot) in mm, and layer thicknesses.
_HEAD_HALF = np.array([66.0, 82.0, 92.0])
_SCALP_MM, _OUTER_TABLE_MM, _DIPLOE_MM, _INNER_TABLE_MM = 5.0, 2.0, 3.0, 2.0
_VENTRICLE_HALF = np.array([9.0, 22.0, 12.0])


class _Head(Scene):
    """A head-like ellipsoid centred where the neck would be: scalp (fat), skull (cortical tables around
    cancellous diploë), brain-like tissue (the cord's values: about 35 HU) and two CSF ventricles. No neck,
    no spine. Everything is labelled soft tissue: the phantom has no skull or brain label."""

    def _centre(self) -> np.ndarray:
        centre = np.mean([v.centre for v in self.spine.vertebrae], axis=0)
        return centre + np.array([0.0, 12.0, 0.0])

    def paint(self, canvas: Canvas) -> None:
        centre = self._centre()

        def inside(p: np.ndarray, half: np.ndarray, offset: tuple[float, float, float] = (0.0, 0.0, 0.0)):
            q = (p - (centre + np.asarray(offset)).astype(np.float32)) / half.astype(np.float32)
            return (q**2).sum(axis=-1) <= 1.0

        def head(p: np.ndarray) -> np.ndarray:
            layers = [  # outside in: each layer overwrites the one before
                (_HEAD_HALF, Tissue.FAT),
                (_HEAD_HALF - _SCALP_MM, Tissue.CORTICAL),
                (_HEAD_HALF - _SCALP_MM - _OUTER_TABLE_MM, Tissue.CANCELLOUS),
                (_HEAD_HALF - _SCALP_MM - _OUTER_TABLE_MM - _DIPLOE_MM, Tissue.CORTICAL),
                (_HEAD_HALF - _SCALP_MM - _OUTER_TABLE_MM - _DIPLOE_MM - _INNER_TABLE_MM, Tissue.CORD),
            ]
            codes = np.zeros(p.shape[:-1], dtype=np.uint8)
            for half, tissue in layers:
                codes[inside(p, half)] = tissue
            for side in (-1.0, 1.0):
                codes[inside(p, _VENTRICLE_HALF, (side * 11.0, -5.0, 10.0))] = Tissue.CSF
            return codes

        canvas.paint(centre - _HEAD_HALF - 1.0, centre + _HEAD_HALF + 1.0, head, None, label=Label.SOFT_TISSUE)

    def paint_inner(self, canvas: Canvas) -> None:
        self.paint(canvas)


def _full_ct(scene: Scene, rng: np.random.Generator) -> RenderedSeries:
    """The phantom's usual axial CT of the neck region (C1 to below T1)."""
    return acquire_ct(scene, rng, Shift(), 0.5)


def _few_slices_ct(scene: Scene, rng: np.random.Generator) -> RenderedSeries:
    """The phantom's axial CT cut to the slices within 1.4 mm of C4's centre: one to three slices (the
    phantom's slice steps lie between 1.2 and 2.5 mm)."""
    centre = scene.spine.by_name["C4"].centre
    return acquire_ct(scene, rng, Shift(), 0.5, roi=(centre, np.array([1e4, 1e4, 1.4])))


@dataclass(frozen=True)
class _Synthetic:
    name: str
    description: str  # also the series descriptions' tail: "SYNTHETIC <modality> <description>"
    expected: ReasonCode
    scene: Callable[[Scene], Scene]  # the drawn spine's scene → the scene to render
    modalities: tuple[str, ...]
    acquire_ct: Callable[[Scene, np.random.Generator], RenderedSeries] = _full_ct


_SYNTHETIC: tuple[_Synthetic, ...] = (
    _Synthetic(
        "synthetic-neck-without-spine",
        "neck without spine (OOD test)",
        ReasonCode.NO_VERTEBRAL_COLUMN,
        lambda s: _NeckWithoutSpine(s.spine, None),
        ("ct", "mr", "xr"),
    ),
    _Synthetic(
        "synthetic-head-ct",
        "head-like ellipsoid, no spine (OOD test)",
        # the seg_ct of 2026-12-07 finds a column of body-like parts in its skull shell, but no canal behind it (before:
        # no vertebral column); its features are out of distribution too
        ReasonCode.NO_CANAL,
        lambda s: _Head(s.spine, None),
        ("ct",),
    ),
    _Synthetic(
        "synthetic-cspine-few-slices",
        "C-spine 1-3 slices (OOD test)",
        ReasonCode.TOO_FEW_SLICES,
        lambda s: s,
        ("ct",),
        _few_slices_ct,
    ),
)


def _labels_present(labels: np.ndarray) -> list[str]:
    return [Label(int(v)).name.lower() for v in np.unique(labels)]


def _write_synthetic(entry: _Synthetic, index: int, seed: int, folder: Path) -> CorpusStudy:
    anatomy_ss, ct_ss, mr_ss, xr_ss = np.random.SeedSequence([seed, index]).spawn(4)
    spine = sample_spine(np.random.default_rng(anatomy_ss), None, 0.0)
    scene = entry.scene(Scene(spine, None))
    study = StudyInfo(
        case_id=f"ood-{entry.name.removeprefix('synthetic-')}",
        seed_key=f"cspine-ood:{seed}:{entry.name}",
        sex="F" if index % 2 else "M",
        age_years=30 + index,
        date=dt.date(2026, 1, 1) + dt.timedelta(days=index),
    )
    if folder.exists():
        shutil.rmtree(folder)
    rendered: dict[str, list[tuple[RenderedSeries, list[Path]]]] = {}
    if "ct" in entry.modalities:
        rng = np.random.default_rng(ct_ss)
        ct = entry.acquire_ct(scene, rng)
        storage = str(rng.choice(list(CT_STORAGE)))
        rendered["ct"] = [(ct, write_ct(ct, study, folder / "ct", storage, f"SYNTHETIC CT {entry.description}"))]
    if "mr" in entry.modalities:
        rng = np.random.default_rng(mr_ss)
        rendered["mr"] = []
        for series in acquire_mr(scene, rng, Shift(), 0.5):
            weighting = "T1" if series.role is SeriesRole.MR_T1 else "T2"
            bits = int(rng.choice([12, 16]))
            description = f"SYNTHETIC MR sag {weighting} {entry.description}"
            rendered["mr"].append((series, write_mr(series, study, folder / "mr", bits, description)))
    if "xr" in entry.modalities:
        xr = acquire_xr(scene, np.random.default_rng(xr_ss), Shift(), 0.5)
        rendered["xr"] = [(xr, write_xr(xr, study, folder / "xr", f"SYNTHETIC XR lateral {entry.description}"))]
    files = tuple(path for key in rendered for _, paths in rendered[key] for path in paths)
    np.savez_compressed(
        folder / LABELS_FILE, **{f"{key}_labels": pairs[0][0].labels for key, pairs in rendered.items()}
    )
    truth = {
        "synthetic": True,
        "note": SYNTHETIC_NOTE,
        "generator": f"cspine {cspine.__version__}",
        "corpus": "out-of-domain",
        "study": entry.name,
        "seed": seed,
        "study_instance_uid": study.study_instance_uid,
        "expected_reason": entry.expected.value,
        "series": {
            series.role.value: {
                "files": [str(p.relative_to(folder)) for p in paths],
                "shape": list(series.values.shape),
                "labels_present": _labels_present(series.labels),
            }
            for key in rendered
            for series, paths in rendered[key]
        },
        "label_maps": {"file": LABELS_FILE, "labels": {str(int(lab)): lab.name.lower() for lab in Label}},
    }
    (folder / TRUTH_FILE).write_text(json.dumps(truth, indent=2) + "\n")
    source = f"SYNTHETIC cspine {cspine.__version__} phantom, seed {seed}"
    description = f"SYNTHETIC {'/'.join(m.upper() for m in entry.modalities)}: {entry.description}"
    return CorpusStudy(entry.name, source, description, entry.expected.value, files)


def synthetic_ood_studies(workdir: Path, seed: int) -> list[CorpusStudy]:
    """Write the SYNTHETIC out-of-domain studies into ``workdir/<name>/`` (DICOM, truth.json, labels.npz;
    a folder of that name is replaced).

    The same seed writes the same studies (UIDs included)."""
    workdir = Path(workdir)
    return [_write_synthetic(entry, i, seed, workdir / entry.name) for i, entry in enumerate(_SYNTHETIC)]
