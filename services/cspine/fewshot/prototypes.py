"""Prototype sets: per class and modality, one prototype embedding made of the support lesions; the prototype
classifier on Triton turns distances to them into probabilities (DESIGN.md §7).

cspine ships a default support set made of SYNTHETIC phantom lesions (``data/default_support.npz``,
written by ``cspine calibrate``) so a fresh install classifies out of the box. A hospital's own support
cases ("site cases") take over from it class by class, by one rule (``PrototypeSet.from_cases``,
docs/support.md): per class and modality, with n site cases and d SYNTHETIC default cases, the prototype is

    w · mean(site cases) + (1 − w) · mean(default cases),   w = min(n, K) / K  (K = SITE_CASES_TO_REPLACE = 20)

so the default's class mean counts as K − n pseudo-cases: 1 site case weighs 5 %, 5 weigh 25 %, 10 weigh
50 %, 20 or more replace the default. A class (or a modality of it) with no default cases uses its site cases
alone (w = 1), so a class new to the site stands on its own cases; one with no site cases keeps the default's
mean (w = 0).

Then, with the ``fitted`` adaptation (what the service ships, ``Adaptation``), once every class has at least
SITE_CASES_TO_FIT site cases, the rule's prototypes of each modality are fitted to the site's cases of that
modality by a few gradient steps of the classifier's cross-entropy, held near the rule's by an L2 pull
(fewshot/adapt.py ``fitted``; about 1 ms). ``plain`` keeps the rule's. A set with fewer site cases is the same
under both.

Once every class has at least SITE_CASES_TO_FIT_FUSION site cases, ``fitted`` also fits the weights the fusion
of modalities gives each modality's class evidence (fewshot/adapt.py ``pooling_weights``, starting from and
pulled toward the shipped calibration's): on the site's cases, each classified by the prototypes of the other
folds of a FUSION_FOLDS-fold split. Fewer site cases keep the calibration's weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cspine.domain import Modality
from cspine.fewshot.adapt import fitted, pooling_weights, softmax_probabilities
from cspine.inference.specs import EMBEDDING_DIM, MAX_PROTOTYPES, MODALITY_ORDER

DEFAULT_SUPPORT = Path(__file__).parent / "data" / "default_support.npz"
# The adaptation the service applies to a site's cases (evaluation/adaptation.py measures it beside the others)
ADAPTATIONS = ("plain", "fitted")
SHIPPED_METHOD = "fitted"
# K of the rule: this many site cases of a class (per modality) replace the SYNTHETIC default's cases; fewer are
# shrunk toward the default's class mean, which counts as K − n pseudo-cases. 20 (5 until 2026-12-08) was chosen
# among 5, 10, 20 and 40 on a tuning seed of the SYNTHETIC sites (9600), not on the seed the figures are reported
# on (docs/support.md).
SITE_CASES_TO_REPLACE = 20
# Site cases every class needs before the fitted adaptation fits the prototypes to them: with fewer, the fit cost
# balanced accuracy on the tuning seed of the SYNTHETIC sites (9600; at 1 to 3 cases per class 2.4 to 2.8 points
# on average over the four sites), with 5 it gained 1.5 (docs/support.md).
SITE_CASES_TO_FIT = 5
# Site cases every class needs before the fitted adaptation refits the fusion weights, and the folds it uses:
# with fewer, the refitted weights cost accuracy on the SYNTHETIC sites (docs/evaluation.md).
SITE_CASES_TO_FIT_FUSION = 10
FUSION_FOLDS = 5


@dataclass(frozen=True)
class SupportSet:
    """Support lesions: ``embeddings`` [N, modalities (MODALITY_ORDER), D] with NaN rows where a case lacks
    a modality, and one class label per case."""

    embeddings: np.ndarray
    labels: tuple[str, ...]
    synthetic: bool = False
    source: str = ""  # where the cases come from, as the store notes them ("": the shipped SYNTHETIC set)
    # the site's own cases (a version's set made from its cohort): seeded into the store as site cases, not as
    # default ones, so that cases a curator adds join them instead of replacing them (docs/support.md)
    site: bool = False

    def __post_init__(self) -> None:
        if self.embeddings.shape[1:] != (len(MODALITY_ORDER), EMBEDDING_DIM) or len(self.labels) != len(
            self.embeddings
        ):
            raise ValueError(f"support embeddings {self.embeddings.shape} do not match {len(self.labels)} labels")

    def save(self, path: Path) -> None:
        np.savez_compressed(
            path,
            embeddings=self.embeddings.astype(np.float32),
            labels=np.array(self.labels),
            synthetic=self.synthetic,
            source=self.source,
            site=self.site,
        )

    @staticmethod
    def load(path: Path = DEFAULT_SUPPORT) -> SupportSet:
        with np.load(path) as npz:
            source = str(npz["source"]) if "source" in npz.files else ""
            site = bool(npz["site"]) if "site" in npz.files else False
            labels = tuple(str(x) for x in npz["labels"])
            return SupportSet(npz["embeddings"], labels, bool(npz["synthetic"]), source, site)


def site_weight(site_cases: int, default_cases: int, k: int = SITE_CASES_TO_REPLACE) -> float:
    """The share of a prototype (one class, one modality) that its site cases' mean gets, 0…1: min(n, K) / K
    while the class has default cases of that modality, 1 when it has none, 0 without site cases."""
    if k < 1:
        raise ValueError(f"K must be at least 1, got {k}")
    if site_cases <= 0:
        return 0.0
    if default_cases <= 0:
        return 1.0
    return min(site_cases, k) / k


@dataclass(frozen=True)
class ModalityWeight:
    """How one class's prototype of one modality is made: from how many site and default cases (those with an
    embedding of the modality), and the site cases' share ``site_weight`` (0…1)."""

    modality: Modality
    site_cases: int
    default_cases: int
    site_weight: float


@dataclass(frozen=True)
class ClassSupport:
    """The cases behind one class's prototypes: its site cases, its SYNTHETIC default cases, and per modality
    it has cases of (MODALITY_ORDER) the weights the rule gave them."""

    label: str
    site_cases: int
    default_cases: int
    modalities: tuple[ModalityWeight, ...]


@dataclass(frozen=True)
class Adaptation:
    """What is done to the rule's prototypes once a set has site cases: ``plain`` (nothing) or ``fitted``
    (fitted to the site's cases for the exported classifier's ``scale``, ``fewshot.adapt.exported_scale``; and,
    given the calibration's classification ``fusion_weights`` in MODALITY_ORDER, the fusion weights refitted
    from them once every class has SITE_CASES_TO_FIT_FUSION site cases)."""

    method: str = "plain"
    scale: float = 0.0
    fusion_weights: tuple[float, ...] = ()

    @staticmethod
    def of_repository(method: str, repository: Path) -> Adaptation:
        """``method`` for the models of ``repository``: ``fitted`` reads the scale of its exported classifier
        and the classification weights of its calibration."""
        if method != "fitted":
            return Adaptation(method)
        from cspine.analysis.fusion import Calibration
        from cspine.fewshot.adapt import exported_scale
        from cspine.inference.model_config import served_model_file

        weights = Calibration.load(repository).classification_weights
        return Adaptation(
            method,
            exported_scale(served_model_file(repository, "proto_classify")),
            tuple(weights[m] for m in MODALITY_ORDER),
        )

    def __post_init__(self) -> None:
        if self.method not in ADAPTATIONS:
            raise ValueError(f"the prototype adaptation must be one of {', '.join(ADAPTATIONS)}; got {self.method!r}")
        if self.method == "fitted" and not self.scale > 0:
            raise ValueError(f"the fitted adaptation needs the classifier's scale (> 0), got {self.scale}")
        if self.fusion_weights and len(self.fusion_weights) != len(MODALITY_ORDER):
            raise ValueError(f"{len(self.fusion_weights)} fusion weights for {len(MODALITY_ORDER)} modalities")


@dataclass(frozen=True)
class PrototypeSet:
    """One immutable prototype set: class labels (in probability order) and, per modality, [K, D] prototypes
    (absent for a modality some class has no case of); ``composition``, per class in the same order, says
    which cases made them and with which weights (rule K: ``site_cases_to_replace``)."""

    version: str
    labels: tuple[str, ...]
    prototypes: dict[Modality, np.ndarray]
    composition: tuple[ClassSupport, ...] = ()
    site_cases_to_replace: int = SITE_CASES_TO_REPLACE
    adaptation: str = "plain"  # what was done to the rule's prototypes: "plain", or "fitted to N site cases"
    # per modality, the weight of its class evidence in the fusion, refitted to the site's cases (empty: the
    # calibration's; module docstring)
    fusion_weights: dict[Modality, float] = field(default_factory=dict)

    @staticmethod
    def from_cases(
        support: SupportSet,
        synthetic: Sequence[bool] | np.ndarray,
        version: str | None = None,
        k: int = SITE_CASES_TO_REPLACE,
        adaptation: Adaptation | None = None,
    ) -> PrototypeSet:
        """Prototypes by the rule (module docstring, docs/support.md) from cases of which ``synthetic[i]`` says
        whether case i is one of the SYNTHETIC default cases (else a site case), then adapted to the site's
        cases by ``adaptation`` (default: plain). Classes are in the order of their first case. Without
        ``version`` the set is named by a digest of its cases: ``default-<hex>`` while every case is of one kind
        (then every prototype is a plain mean, as it always was), ``site-<hex>`` when site cases are mixed with
        default ones."""
        flags = np.asarray(synthetic, dtype=bool)
        if flags.shape != (len(support.labels),):
            raise ValueError(f"{flags.shape[0] if flags.ndim else 0} synthetic flags for {len(support.labels)} cases")
        site_weight(0, 0, k)  # checks k
        labels = tuple(dict.fromkeys(support.labels))
        if len(labels) > MAX_PROTOTYPES:
            raise ValueError(f"{len(labels)} classes: at most {MAX_PROTOTYPES} are supported")
        owner = np.array(support.labels)
        present = ~np.isnan(support.embeddings).any(axis=2)  # [N, modalities]
        rows: dict[Modality, list[np.ndarray]] = {modality: [] for modality in MODALITY_ORDER}
        composition = []
        for label in labels:
            mine = owner == label
            weights = []
            for m, modality in enumerate(MODALITY_ORDER):
                site = support.embeddings[mine & ~flags & present[:, m], m]
                default = support.embeddings[mine & flags & present[:, m], m]
                if not len(site) and not len(default):
                    continue
                w = site_weight(len(site), len(default), k)
                if w == 1.0:
                    rows[modality].append(site.mean(axis=0))
                elif w == 0.0:
                    rows[modality].append(default.mean(axis=0))
                else:
                    site_mean = site.astype(np.float64).mean(axis=0)
                    rows[modality].append(w * site_mean + (1.0 - w) * default.astype(np.float64).mean(axis=0))
                weights.append(ModalityWeight(modality, len(site), len(default), w))
            site_cases, default_cases = int((mine & ~flags).sum()), int((mine & flags).sum())
            composition.append(ClassSupport(label, site_cases, default_cases, tuple(weights)))
        prototypes = {
            modality: np.stack(found).astype(np.float32)
            for modality, found in rows.items()
            if labels and len(found) == len(labels)  # every class has a prototype of this modality
        }
        method = adaptation.method if adaptation is not None else "plain"
        described = "plain"
        site_labels = owner[~flags]
        fewest = min(int((site_labels == label).sum()) for label in labels) if labels else 0
        if method == "fitted" and fewest >= SITE_CASES_TO_FIT:
            assert adaptation is not None
            classes = np.array([labels.index(label) for label in support.labels])
            for m, modality in enumerate(MODALITY_ORDER):
                rows_m = ~flags & present[:, m]
                if modality in prototypes and rows_m.any():
                    prototypes[modality] = fitted(
                        support.embeddings[rows_m, m], classes[rows_m], prototypes[modality], adaptation.scale
                    )
            described = f"fitted to {int((~flags).sum())} site cases"
        fusion: dict[Modality, float] = {}
        if (
            method == "fitted"
            and adaptation is not None
            and adaptation.fusion_weights
            and fewest >= SITE_CASES_TO_FIT_FUSION
        ):
            plain_fusion = replace(adaptation, fusion_weights=())
            held_out, truth = held_out_log_probabilities(support, flags, labels, plain_fusion)
            pooled = pooling_weights(held_out, truth, np.array(adaptation.fusion_weights))
            fusion = {m: round(float(w), 4) for m, w in zip(MODALITY_ORDER, pooled, strict=True)}
        digest = hashlib.sha256(np.ascontiguousarray(support.embeddings, dtype=np.float32).tobytes())
        digest.update("\n".join(support.labels).encode())
        mixed = flags.any() and not flags.all()
        if mixed:  # the same cases as site or default ones make other prototypes: the name tells them apart
            digest.update(np.packbits(flags).tobytes() + f"\nK={k}".encode())
        if described != "plain":
            digest.update(f"\n{method} {adaptation.scale if adaptation else 0:.6g} {fusion}".encode())
        name = version or f"{'site' if mixed else 'default'}-{digest.hexdigest()[:12]}"
        return PrototypeSet(name, labels, prototypes, tuple(composition), k, described, fusion)

    @staticmethod
    def from_support(support: SupportSet, version: str | None = None) -> PrototypeSet:
        """Prototypes of one kind of cases (all default or all site, as ``support.synthetic`` says): per class
        and modality the plain mean of its cases."""
        return PrototypeSet.from_cases(support, [support.synthetic] * len(support.labels), version)

    def site_weight_of(self, label: str, modality: Modality) -> float:
        """The share of ``label``'s ``modality`` prototype its site cases got (0 when it has none)."""
        for cls in self.composition:
            if cls.label == label:
                return next((w.site_weight for w in cls.modalities if w.modality == modality), 0.0)
        raise KeyError(label)


def held_out_log_probabilities(
    support: SupportSet, flags: np.ndarray, labels: tuple[str, ...], adaptation: Adaptation
) -> tuple[np.ndarray, np.ndarray]:
    """Each site case's [modalities, K] log-probabilities from the prototypes (by the rule, then ``adaptation``)
    of the cases outside its fold (FUSION_FOLDS folds, each class's site cases dealt round-robin; 0 for a
    modality the case lacks), and its class index in ``labels``."""
    owner = np.array(support.labels)
    site = np.nonzero(~flags)[0]
    fold = np.zeros(len(site), dtype=int)
    for label in labels:
        mine = np.nonzero(owner[site] == label)[0]
        fold[mine] = np.arange(len(mine)) % FUSION_FOLDS
    held_out = np.zeros((len(site), len(MODALITY_ORDER), len(labels)))
    for f in range(FUSION_FOLDS):
        out = site[fold == f]
        keep = np.ones(len(flags), dtype=bool)
        keep[out] = False
        rest = SupportSet(support.embeddings[keep], tuple(owner[keep]))
        others = PrototypeSet.from_cases(rest, flags[keep], "held-out", adaptation=adaptation)
        order = [others.labels.index(label) for label in labels]
        for m, modality in enumerate(MODALITY_ORDER):
            embeddings = support.embeddings[out, m]
            present = ~np.isnan(embeddings).any(axis=1)
            if modality in others.prototypes and present.any():
                p = softmax_probabilities(embeddings[present], others.prototypes[modality][order], adaptation.scale)
                held_out[np.nonzero(fold == f)[0][present], m] = np.log(np.clip(p, 1e-9, None))
    return held_out, np.array([labels.index(label) for label in owner[site]])


def site_prototypes(
    default: SupportSet,
    site: SupportSet,
    version: str | None = None,
    k: int = SITE_CASES_TO_REPLACE,
    adaptation: Adaptation | None = None,
) -> PrototypeSet:
    """A site's cases on top of a default set (every case of ``default`` counts as SYNTHETIC default, every one
    of ``site`` as the site's), by the same rule the support store applies to a version's cases."""
    both = SupportSet(np.concatenate([default.embeddings, site.embeddings]), default.labels + site.labels)
    flags = [True] * len(default.labels) + [False] * len(site.labels)
    return PrototypeSet.from_cases(both, flags, version, k, adaptation)


def default_prototypes(repository: Path | None = None) -> PrototypeSet:
    """The prototypes of the default support set (of the served version set of ``repository``, when given)."""
    return PrototypeSet.from_support(default_support(repository) if repository is not None else SupportSet.load())


def default_support(repository: Path) -> SupportSet:
    """The served version set's default support set: ``default_support.vN.npz`` beside its models when version
    N has one (its lesion embedding was fine-tuned, ``cspine export --version N``), else the shipped SYNTHETIC
    set (``DEFAULT_SUPPORT``), whose vectors are version 1's embedding."""
    from cspine.inference.model_config import version_file

    path = version_file(repository, DEFAULT_SUPPORT.name)
    return SupportSet.load(path if path.exists() else DEFAULT_SUPPORT)


def embedding_key(repository: Path) -> str:
    """Which lesion embedding the served version set of ``repository`` makes vectors with, as the support store
    records it: ``""`` when its ``lesion_embed`` is version 1's (byte for byte), else the first 16 hex digits of
    the model's SHA-256. Vectors of two keys cannot be compared."""
    from cspine.inference.model_config import served_model_file

    served = hashlib.sha256(served_model_file(repository, "lesion_embed").read_bytes()).hexdigest()
    first = Path(repository) / "lesion_embed" / "1" / "model.onnx"
    if first.exists() and hashlib.sha256(first.read_bytes()).hexdigest() == served:
        return ""
    return served[:16]
