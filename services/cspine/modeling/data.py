"""Training and evaluation data, all SYNTHETIC, made by the phantom and cached on disk.

- Segmentation cases: a phantom case is written as DICOM, read back by cspine's own ingest and series
  selection, and preprocessed by the same functions the pipeline uses, so what a model learns from is
  what it will be served. The cache keeps, per case and modality, the normalised slices on the model
  grid and the label map in the model's label table.
- The lesion bank: lesion ROIs of many tumors per subtype. Only a window around each lesion is rendered
  (the same acquisition protocols, cropped), which makes a lesion about twenty times cheaper than a
  whole study.

Both are keyed by seed and by ``CACHE_VERSION``; a cache made by other code is never read.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from cspine.dicom.ingest import ingest_paths
from cspine.dicom.selection import select_series
from cspine.domain import Modality, SeriesRole, Volume
from cspine.fewshot.prototypes import SupportSet
from cspine.imaging.roi import lesion_roi
from cspine.imaging.seg_input import seg_inputs, to_grid
from cspine.inference.runner import onnx_session
from cspine.inference.specs import EMBEDDING_DIM, MODALITY_ORDER, SEG_GEOMETRY, SEG_LABELS
from cspine.phantom.anatomy import Label, level_code, sample_spine
from cspine.phantom.generate import PhantomOptions, generate_case
from cspine.phantom.scanner import (
    RenderedSeries,
    Scene,
    Shift,
    acquire_ct,
    acquire_mr,
    acquire_xr,
    varied_scanner,
)
from cspine.phantom.tumors import SUBTYPES, TumorClass, TumorSubtype, place_tumor, plan_tumor

logger = logging.getLogger(__name__)

CACHE_VERSION = "1"
CLASSES: tuple[str, ...] = tuple(c.value for c in TumorClass)  # benign, borderline, malignant
# Held out of meta-training, one per class: few-shot evaluation is on subtypes the embedding never saw.
UNSEEN_SUBTYPES: tuple[TumorSubtype, ...] = (
    TumorSubtype.OSTEOCHONDROMA,
    TumorSubtype.OSTEOBLASTOMA,
    TumorSubtype.MYELOMA,
)
SEEN_SUBTYPES: tuple[TumorSubtype, ...] = tuple(s for s in TumorSubtype if s not in UNSEEN_SUBTYPES)
SEG_ROLES: dict[Modality, tuple[SeriesRole, ...]] = {
    Modality.CT: (SeriesRole.CT,),
    Modality.MR: (SeriesRole.MR_T1, SeriesRole.MR_T2),
    Modality.XR: (SeriesRole.XR,),
}
ROI_WINDOW_MM = 48.0  # half size of the rendered window around a lesion (ROI planes reach 32 mm)


# --------------------------------------------------------------------------------------------------------
# Phantom labels → each model's label table


def _table(pairs: dict[Label, str], modality: Modality) -> np.ndarray:
    names = SEG_LABELS[modality]
    table = np.zeros(256, dtype=np.uint8)
    for label, name in pairs.items():
        table[int(label)] = names.index(name)
    return table


_CT_TABLE = _table(
    {
        Label.VERTEBRAL_BODY: "vertebral_body",
        Label.POSTERIOR_ELEMENTS: "posterior_elements",
        Label.DISC: "disc",
        Label.CSF: "canal",
        Label.CORD: "canal",
        Label.OPLL: "opll",
        Label.TUMOR: "tumor",
    },
    Modality.CT,
)
_MR_TABLE = _table(
    {
        Label.VERTEBRAL_BODY: "vertebral_body",
        Label.POSTERIOR_ELEMENTS: "posterior_elements",
        Label.DISC: "disc",
        Label.CSF: "csf",
        Label.CORD: "cord",
        Label.TUMOR: "tumor",
    },
    Modality.MR,
)


def model_labels(modality: Modality, structure: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Phantom structure labels (and vertebral levels) in a modality's model label table."""
    if modality is Modality.CT:
        return _CT_TABLE[structure]
    if modality is Modality.MR:
        return _MR_TABLE[structure]
    names = SEG_LABELS[Modality.XR]
    out = np.zeros(structure.shape, dtype=np.uint8)
    body = structure == Label.VERTEBRAL_BODY
    out[body] = names.index("other_body")
    for name in ("C2", "C3", "C4", "C5", "C6", "C7"):
        out[body & (levels == level_code(name))] = names.index(f"{name.lower()}_body")
    out[structure == Label.POSTERIOR_ELEMENTS] = names.index("posterior_elements")
    out[structure == Label.DISC] = names.index("disc")
    out[structure == Label.TUMOR] = names.index("tumor")
    return out


# --------------------------------------------------------------------------------------------------------
# Segmentation cases


def lesion_boxes(tumor: np.ndarray) -> list[tuple[slice, ...]]:
    """Bounding box of each connected lesion in a [K, H, W] (or [H, W]) tumor mask: the weak label a
    busy clinic can afford to draw, one box per lesion."""
    if not tumor.any():
        return []
    components, _ = ndimage.label(tumor, structure=np.ones((3,) * tumor.ndim))
    return [box for box in ndimage.find_objects(components) if box is not None]


@dataclass
class SegCase:
    """One case's segmentation data for one modality on the model grid."""

    images: dict[SeriesRole, np.ndarray]  # [K, S, S] normalised centre slices (no context channels)
    labels: np.ndarray  # [K, S, S] uint8, the modality's label table
    # Box supervision, second phase: the labels with each lesion box filled by the model's own answer
    # (self-training); boxes the model found nothing in stay unknown.
    pseudo: np.ndarray | None = None
    filled: frozenset[int] = frozenset()  # indices (in boxes()) of the boxes ``pseudo`` fills

    def boxes(self) -> list[tuple[slice, ...]]:
        tumor_label = SEG_LABELS[_modality_of(self.images)].index("tumor")
        return lesion_boxes(self.labels == tumor_label)


def _modality_of(images: dict[SeriesRole, np.ndarray]) -> Modality:
    return next(iter(images)).modality


def modality_seg_arrays(modality: Modality, volumes: Mapping[SeriesRole, Volume], labels: np.ndarray) -> dict:
    """One modality's training arrays on the model grid: ``<role>_image`` per volume (centre slices, float16) and
    ``<modality>_labels``; ``labels`` [K, R, C] in the modality's table, on the voxel grid of the last volume."""
    out: dict[str, np.ndarray] = {}
    grid = None
    for role, volume in volumes.items():
        inputs, grid = seg_inputs(modality, volume)
        out[f"{role.value}_image"] = inputs[:, SEG_GEOMETRY[modality].context].astype(np.float16)
    if grid is None:
        raise ValueError(f"no {modality.value} volume to put the labels on")
    out[f"{modality.value.lower()}_labels"] = to_grid(labels, grid, order=0, fill=0).astype(np.uint8)
    return out


def case_seg_arrays(case_dir: Path) -> dict[str, np.ndarray]:
    """Ingest a written phantom case and preprocess every modality: arrays keyed ``<role>_image`` and
    ``<modality>_labels`` (lower case), all on the model grid."""
    study = ingest_paths([case_dir / folder for folder in ("ct", "mr", "xr") if (case_dir / folder).exists()])
    chosen = select_series(study).chosen
    with np.load(case_dir / "labels.npz") as npz:
        truth = {k: npz[k] for k in npz.files}
    out: dict[str, np.ndarray] = {}
    for modality, roles in SEG_ROLES.items():
        key = modality.value.lower()
        if f"{key}_labels" not in truth:
            continue
        volumes = {}
        for role in roles:
            volume = chosen[role].volume
            assert volume is not None  # select_series chooses only series with a volume
            volumes[role] = volume
        structure, levels = truth[f"{key}_labels"], truth[f"{key}_levels"]
        if modality is Modality.XR:
            structure, levels = structure[None], levels[None]
        out.update(modality_seg_arrays(modality, volumes, model_labels(modality, structure, levels)))
    return out


def load_seg_case(path: Path, modality: Modality) -> SegCase:
    """A cached case's arrays for one modality (every role of it the case has images of)."""
    with np.load(path) as npz:
        images = {role: npz[f"{role.value}_image"] for role in SEG_ROLES[modality] if f"{role.value}_image" in npz}
        return SegCase(images, npz[f"{modality.value.lower()}_labels"])


def _seg_job(args: tuple[Path, int, int, str]) -> Path:
    out, seed, index, tumor = args
    if not out.exists():
        with tempfile.TemporaryDirectory(prefix="cspine-seg-") as tmp:
            generate_case(Path(tmp) / "case", f"train-{index:04d}", seed, index, PhantomOptions(tumor=tumor))
            arrays = case_seg_arrays(Path(tmp) / "case")
        partial = out.with_suffix(".partial.npz")
        np.savez(partial, **arrays)
        partial.rename(out)
    return out


def seg_cases(cache: Path, seed: int, count: int, workers: int = 1, progress: bool = True) -> list[Path]:
    """Paths of ``count`` cached SYNTHETIC segmentation cases of cohort ``seed`` (made when missing)."""
    folder = cache / f"seg-v{CACHE_VERSION}" / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"case-{i:04d}.npz", seed, i, "random") for i in range(count)]
    return _run(jobs, _seg_job, workers, progress, "segmentation cases")


def _run(jobs: list, fn: Callable, workers: int, progress: bool, what: str) -> list:
    bar = tqdm(total=len(jobs), desc=what, unit="case", disable=not progress)
    results = []
    try:
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for result in pool.map(fn, jobs):
                    results.append(result)
                    bar.update()
        else:
            for job in jobs:
                results.append(fn(job))
                bar.update()
    finally:
        bar.close()
    return results


# --------------------------------------------------------------------------------------------------------
# The lesion bank


def _main_centre(series: RenderedSeries, volume: Volume) -> np.ndarray | None:
    """Patient position of the centroid of the largest lesion in a rendered window."""
    tumor = series.labels == Label.TUMOR
    if tumor.ndim == 2:
        tumor = tumor[None]
    if tumor.sum() < 4:
        return None
    components, count = ndimage.label(tumor, structure=np.ones((3, 3, 3)))
    sizes = ndimage.sum_labels(tumor, components, index=np.arange(1, count + 1))
    kij = np.argwhere(components == 1 + int(np.argmax(sizes))).mean(axis=0)
    return volume.index_to_patient(kij[None])[0]


def lesion_sample(
    seed: int, index: int, subtype: TumorSubtype, difficulty: tuple[float, float], scanners: float = 0.0
) -> np.ndarray | None:
    """ROIs [3 modalities, 3, 64, 64] of one SYNTHETIC lesion, or None when it could not be placed. With
    probability ``scanners`` it is imaged by a randomly drawn scanner (``varied_scanner``), else by the default
    site's."""
    anatomy_ss, ct_ss, mr_ss, xr_ss, jitter_ss, scanner_ss = np.random.SeedSequence([seed, index]).spawn(6)
    scanner_rng = np.random.default_rng(scanner_ss)
    scanner = varied_scanner(scanner_rng) if scanner_rng.uniform() < scanners else None
    rng = np.random.default_rng(anatomy_ss)
    level = float(rng.uniform(*difficulty))
    plan = plan_tumor(rng, subtype, level)
    spine = sample_spine(rng, plan.collapse)
    jitter = np.random.default_rng(jitter_ss)
    for _ in range(10):
        tumor = place_tumor(rng, plan, spine, level)
        scene = Scene(spine, tumor)
        window = (tumor.blobs[0].centre, ROI_WINDOW_MM)
        ct = acquire_ct(scene, np.random.default_rng(ct_ss), Shift(), level, roi=window, scanner=scanner)
        ct_volume = ct.as_volume()
        centre = _main_centre(ct, ct_volume)
        if centre is not None:
            break
    else:
        return None
    rois = np.zeros((len(MODALITY_ORDER), 3, 64, 64), dtype=np.float32)
    rois[0] = lesion_roi(Modality.CT, {SeriesRole.CT: ct_volume}, centre + jitter.normal(0, 1.5, 3))
    t1, t2 = acquire_mr(scene, np.random.default_rng(mr_ss), Shift(), level, roi=window, scanner=scanner)
    volumes = {SeriesRole.MR_T1: t1.as_volume(), SeriesRole.MR_T2: t2.as_volume()}
    mr_centre = _main_centre(t1, volumes[SeriesRole.MR_T1])
    rois[1] = lesion_roi(Modality.MR, volumes, (centre if mr_centre is None else mr_centre) + jitter.normal(0, 1.5, 3))
    xr = acquire_xr(scene, np.random.default_rng(xr_ss), Shift(), level, roi=window, scanner=scanner)
    xr_volume = xr.as_volume()
    xr_centre = _main_centre(xr, xr_volume)
    if xr_centre is None:  # hidden behind denser structures on the radiograph: centre of the window
        xr_centre = xr_volume.index_to_patient(
            np.array([[0.0, (xr.values.shape[1] - 1) / 2, (xr.values.shape[2] - 1) / 2]])
        )[0]
    rois[2] = lesion_roi(Modality.XR, {SeriesRole.XR: xr_volume}, xr_centre + jitter.normal(0, 1.5, 3) * [0, 1, 1])
    return rois


@dataclass
class LesionBank:
    """ROIs of SYNTHETIC lesions: ``rois`` [N, modalities, 3, 64, 64], with subtype and class per lesion."""

    rois: np.ndarray
    subtypes: np.ndarray  # [N] index into list(TumorSubtype)
    classes: np.ndarray  # [N] index into CLASSES

    def select(self, subtypes: Iterable[TumorSubtype]) -> LesionBank:
        wanted = [list(TumorSubtype).index(s) for s in subtypes]
        keep = np.isin(self.subtypes, wanted)
        return LesionBank(self.rois[keep], self.subtypes[keep], self.classes[keep])

    def __len__(self) -> int:
        return len(self.subtypes)


def _lesion_job(args: tuple[int, int, TumorSubtype, tuple[float, float], float]) -> np.ndarray | None:
    return lesion_sample(*args)


def lesion_bank(
    cache: Path,
    seed: int,
    subtypes: Iterable[TumorSubtype],
    per_subtype: int,
    difficulty: tuple[float, float] = (0.3, 0.7),
    workers: int = 1,
    progress: bool = True,
    scanners: float = 0.0,
) -> LesionBank:
    """``per_subtype`` SYNTHETIC lesions of each subtype (cached per seed and subtype); ``scanners``: the share
    imaged by a randomly drawn scanner (``lesion_sample``)."""
    name = f"seed{seed}-d{difficulty[0]:.2f}-{difficulty[1]:.2f}" + (f"-scanners{scanners:.2f}" if scanners else "")
    folder = cache / f"lesions-v{CACHE_VERSION}" / name
    folder.mkdir(parents=True, exist_ok=True)
    all_subtypes = list(TumorSubtype)
    rois, subs, classes = [], [], []
    for subtype in subtypes:
        path = folder / f"{subtype.value}-{per_subtype}.npy"
        if not path.exists():
            code = all_subtypes.index(subtype)
            jobs = [(seed * 1000 + code, i, subtype, difficulty, scanners) for i in range(per_subtype)]
            made = [r for r in _run(jobs, _lesion_job, workers, progress, subtype.value) if r is not None]
            partial = path.with_suffix(".partial.npy")
            np.save(partial, np.stack(made).astype(np.float16))
            partial.rename(path)
        arr = np.load(path).astype(np.float32)
        rois.append(arr)
        subs.append(np.full(len(arr), all_subtypes.index(subtype)))
        classes.append(np.full(len(arr), CLASSES.index(SUBTYPES[subtype].tumor_class.value)))
    return LesionBank(np.concatenate(rois), np.concatenate(subs), np.concatenate(classes))


# Phantom seed of the default support sets (evaluation/calibrate.py): the shipped one, cut the way the service
# cuts, and the one cut about the true lesion centres that the evaluations on ground-truth ROIs use.
SUPPORT_SEED = 9200


def embed_bank(bank: LesionBank, embed_model: Path) -> np.ndarray:
    """The embeddings [N, modalities, D] of a bank's ROIs, NaN where a ROI is NaN (no lesion of that modality)."""
    session = onnx_session(embed_model)
    onehots = np.eye(len(MODALITY_ORDER), dtype=np.float32)
    embeddings = np.full((len(bank), len(MODALITY_ORDER), EMBEDDING_DIM), np.nan, dtype=np.float32)
    for m in range(len(MODALITY_ORDER)):
        rows = np.flatnonzero(~np.isnan(bank.rois[:, m]).any(axis=(1, 2, 3)))
        for start in range(0, len(rows), 32):
            chunk = rows[start : start + 32]
            embeddings[chunk, m] = session.run(
                None, {"roi": bank.rois[chunk, m], "modality": np.tile(onehots[m], (len(chunk), 1))}
            )[0]
    return embeddings


def ground_truth_support(cache: Path, embed_model: Path, per_subtype: int = 12, workers: int = 1) -> SupportSet:
    """The default support set of the evaluations on ground-truth ROIs (evaluation/adaptation.py, ``cspine evaluate
    sites``): ``per_subtype`` SYNTHETIC lesions of each subtype with their ROIs about the true lesion centre, the
    way those evaluations cut their queries (the set cspine shipped until 2026-12-06)."""
    bank = lesion_bank(cache, SUPPORT_SEED, list(TumorSubtype), per_subtype, workers=workers, progress=False)
    return SupportSet(embed_bank(bank, embed_model), tuple(CLASSES[c] for c in bank.classes), synthetic=True)
