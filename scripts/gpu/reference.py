"""Reference inputs and ONNX Runtime's answers for the GPU run's parity checks (``scripts/gpu/prepare.sh`` runs it
here, where ONNX Runtime and the phantom are; the GPU machine has neither).

Real model inputs, not noise: SYNTHETIC phantom cases rendered and preprocessed as the service does
(``imaging.seg_input``), lesion ROIs cut as the lesion bank cuts them (``modeling.data.lesion_sample``), and the
class prototypes of the shipped default support set (CT embeddings, class means). Images and ROIs are stored in
FP16 (exactly: they are rounded first, and the answers computed on the rounded values). Writes one compressed npz
with ``<model>.<tensor>`` keys; ``lesion_embed`` also carries the prototypes and the probabilities its embeddings give
(what the ``lesion_classify`` ensemble answers).

    python scripts/gpu/reference.py --out .gpu-carry/reference.npz
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from cspine.domain import Modality, SeriesRole
from cspine.imaging.roi import modality_one_hot
from cspine.imaging.seg_input import seg_inputs
from cspine.inference.local_triton import default_repository
from cspine.inference.runner import OnnxRunner
from cspine.inference.specs import LESION_EMBED, MODALITY_ORDER, MODELS, PROTO_CLASSIFY, SEG_MODEL_NAMES
from cspine.modeling.data import lesion_sample
from cspine.phantom.generate import PhantomOptions, plan_case, render_case
from cspine.phantom.tumors import TumorSubtype

logger = logging.getLogger("gpu-reference")

SEED = 9700  # SYNTHETIC cases of their own, apart from training (1), evaluation (9001, 9002) and calibration (9400)
TUMORS = ("metastasis", "hemangioma", "schwannoma", "chordoma")
# Slices kept per series (evenly spaced through it): enough pixels for a label agreement read to 0.1 %.
SLICES = {SeriesRole.CT: 12, SeriesRole.MR_T1: 8, SeriesRole.MR_T2: 8, SeriesRole.XR: 1}
SUPPORT = Path(__file__).resolve().parents[2] / "services" / "cspine" / "fewshot" / "data" / "default_support.npz"


def _spaced(values: np.ndarray, count: int) -> np.ndarray:
    return values[np.unique(np.linspace(0, len(values) - 1, count).round().astype(int))]


def seg_reference(cases: int) -> dict[str, np.ndarray]:
    """Preprocessed slices of ``cases`` phantom cases, per segmentation model."""
    images: dict[str, list[np.ndarray]] = {name: [] for name in SEG_MODEL_NAMES.values()}
    for index in range(cases):
        tumor = TUMORS[index % len(TUMORS)]
        case = render_case(plan_case(f"gpu-reference-{index}", SEED, index, PhantomOptions(tumor=tumor)))
        for role, count in SLICES.items():
            modality = role.modality
            inputs, _ = seg_inputs(modality, case.series[role].as_volume())
            images[SEG_MODEL_NAMES[modality]].append(_spaced(inputs, count))
    # Rounded to FP16 to halve the file that travels; the reference answers are computed on the rounded values.
    return {name: np.concatenate(parts).astype(np.float16).astype(np.float32) for name, parts in images.items()}


def lesion_reference(lesions: int) -> tuple[np.ndarray, np.ndarray]:
    """ROIs [N, 3, 64, 64] of ``lesions`` SYNTHETIC lesions in each modality, and their one-hot modalities."""
    rois, modalities = [], []
    for index in range(lesions):
        sample = lesion_sample(SEED + 1, index, TumorSubtype(TUMORS[index % len(TUMORS)]), (0.3, 0.7))
        if sample is None:
            continue
        for m, modality in enumerate(MODALITY_ORDER):
            rois.append(sample[m])
            modalities.append(modality_one_hot(modality))
    return np.stack(rois).astype(np.float16).astype(np.float32), np.stack(modalities).astype(np.float32)


def support_prototypes() -> np.ndarray:
    """One prototype per class of the shipped default support set: the mean of its CT embeddings."""
    with np.load(SUPPORT) as npz:
        embeddings, labels = npz["embeddings"], npz["labels"]
    ct = embeddings[:, MODALITY_ORDER.index(Modality.CT)]
    return np.stack([np.nanmean(ct[labels == label], axis=0) for label in sorted(set(labels))]).astype(np.float32)


def build(out: Path, cases: int, lesions: int, repository: Path) -> dict[str, np.ndarray]:
    began = time.monotonic()
    runners = {name: OnnxRunner(spec, repository / name / "1" / "model.onnx", 2) for name, spec in MODELS.items()}
    arrays: dict[str, np.ndarray] = {}
    for name, image in seg_reference(cases).items():
        arrays[f"{name}.image"] = image
        for key, value in runners[name].run({"image": image}).items():
            arrays[f"{name}.{key}"] = value
    roi, modality = lesion_reference(lesions)
    embedding = runners[LESION_EMBED.name].run({"roi": roi, "modality": modality})["embedding"]
    prototypes = support_prototypes()
    probabilities = runners[PROTO_CLASSIFY.name].run({"embedding": embedding, "prototypes": prototypes})[
        "probabilities"
    ]
    arrays.update(
        {
            "lesion_embed.roi": roi,
            "lesion_embed.modality": modality,
            "lesion_embed.embedding": embedding,
            "lesion_embed.prototypes": prototypes,
            "lesion_embed.probabilities": probabilities,
            "proto_classify.embedding": embedding,
            "proto_classify.prototypes": prototypes,
            "proto_classify.probabilities": probabilities,
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    stored = {k: v.astype(np.float16) if k.endswith((".image", ".roi")) else v for k, v in arrays.items()}
    np.savez_compressed(out, **stored)
    logger.info(
        "wrote %s (%.1f MB) in %.0f s: %s",
        out,
        out.stat().st_size / 1e6,
        time.monotonic() - began,
        ", ".join(f"{k} {v.shape}" for k, v in arrays.items()),
    )
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", type=int, default=2, help="phantom cases for the segmentation inputs")
    parser.add_argument("--lesions", type=int, default=4, help="SYNTHETIC lesions (3 ROIs each) for the embedding")
    parser.add_argument("--repository", type=Path, default=default_repository())
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    build(args.out, args.cases, args.lesions, args.repository)


if __name__ == "__main__":
    main()
