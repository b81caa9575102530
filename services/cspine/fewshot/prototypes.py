"""Prototype sets: per class and modality, the mean embedding of the support lesions; the prototype
classifier on Triton turns distances to them into probabilities (DESIGN.md §7).

cspine ships a default support set made of SYNTHETIC phantom lesions (``data/default_support.npz``,
written by ``cspine calibrate``) so a fresh install classifies out of the box; a hospital's own support
cases replace it through the support-set API.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cspine.domain import Modality
from cspine.inference.specs import EMBEDDING_DIM, MAX_PROTOTYPES, MODALITY_ORDER

DEFAULT_SUPPORT = Path(__file__).parent / "data" / "default_support.npz"


@dataclass(frozen=True)
class SupportSet:
    """Support lesions: ``embeddings`` [N, modalities (MODALITY_ORDER), D] with NaN rows where a case lacks
    a modality, and one class label per case."""

    embeddings: np.ndarray
    labels: tuple[str, ...]
    synthetic: bool = False

    def __post_init__(self) -> None:
        if self.embeddings.shape[1:] != (len(MODALITY_ORDER), EMBEDDING_DIM) or len(self.labels) != len(
            self.embeddings
        ):
            raise ValueError(f"support embeddings {self.embeddings.shape} do not match {len(self.labels)} labels")

    def save(self, path: Path) -> None:
        np.savez_compressed(
            path, embeddings=self.embeddings.astype(np.float32), labels=np.array(self.labels), synthetic=self.synthetic
        )

    @staticmethod
    def load(path: Path = DEFAULT_SUPPORT) -> SupportSet:
        with np.load(path) as npz:
            return SupportSet(npz["embeddings"], tuple(str(x) for x in npz["labels"]), bool(npz["synthetic"]))


@dataclass(frozen=True)
class PrototypeSet:
    """One immutable prototype set: class labels (in probability order) and, per modality, [K, D] prototypes
    (absent for a modality no support case has)."""

    version: str
    labels: tuple[str, ...]
    prototypes: dict[Modality, np.ndarray]

    @staticmethod
    def from_support(support: SupportSet, version: str | None = None) -> PrototypeSet:
        labels = tuple(sorted(set(support.labels), key=support.labels.index))
        if len(labels) > MAX_PROTOTYPES:
            raise ValueError(f"{len(labels)} classes: at most {MAX_PROTOTYPES} are supported")
        owner = np.array(support.labels)
        prototypes = {}
        for m, modality in enumerate(MODALITY_ORDER):
            rows = []
            for label in labels:
                emb = support.embeddings[owner == label, m]
                emb = emb[~np.isnan(emb).any(axis=1)]
                if len(emb):
                    rows.append(emb.mean(axis=0))
            if len(rows) == len(labels):  # every class has an embedding of this modality
                prototypes[modality] = np.stack(rows).astype(np.float32)
        digest = hashlib.sha256(np.ascontiguousarray(support.embeddings, dtype=np.float32).tobytes())
        digest.update("\n".join(support.labels).encode())
        return PrototypeSet(version or f"default-{digest.hexdigest()[:12]}", labels, prototypes)


def default_prototypes() -> PrototypeSet:
    return PrototypeSet.from_support(SupportSet.load(DEFAULT_SUPPORT))
