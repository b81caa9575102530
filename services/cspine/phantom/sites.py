"""SYNTHETIC sites: distribution shifts of scanner, protocol and population (``cspine phantom --site NAME``).

A ``SiteProfile`` is a named pair of a ``ScannerProfile`` (per modality: noise, resolution, contrast, slice
thickness, reconstruction kernel; MR field strength and T1/T2 weighting) and a ``Population`` (age range, disc
degeneration and OPLL prevalence, tumour-free share, subtype mix, lesion size). ``default`` changes nothing:
the same seed writes the same bytes as before sites existed. The others are shifts away from what the
shipped models were trained on; their measured effect on the models is in docs/phantom.md. Everything a site
makes is as SYNTHETIC as the rest of the phantom: a site imitates a kind of hospital, it is no real one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from cspine.phantom.scanner import Protocol, ScannerProfile
from cspine.phantom.tumors import SUBTYPES, TumorClass, TumorSubtype

DEFAULT_SITE = "default"
DEFAULT_AGE_YEARS = (18, 50)  # inclusive: what the phantom drew before sites existed
DEFAULT_OPLL = 0.12  # generate.OPLL_PROBABILITY["random"]
DEFAULT_TUMOR_FREE_SHARE = 0.25  # generate.TUMOR_FREE_SHARE


@dataclass(frozen=True)
class Population:
    """Who a site sees; the defaults are the phantom's own population.

    ``degeneration`` multiplies each disc's probability of degeneration (0.35 at C5 and C6, 0.12 elsewhere,
    capped at 1); ``opll`` is the OPLL probability when ``--opll random``; ``subtype_weights`` multiply the
    relative frequencies of ``tumors.SUBTYPES`` (a subtype not named keeps its own); ``lesion_size`` multiplies
    every subtype's median lesion diameter (the log-sd and the 5–60 mm clip stay)."""

    age_years: tuple[int, int] = DEFAULT_AGE_YEARS
    degeneration: float = 1.0
    opll: float = DEFAULT_OPLL
    tumor_free_share: float = DEFAULT_TUMOR_FREE_SHARE
    subtype_weights: Mapping[str, float] = field(default_factory=dict)
    lesion_size: float = 1.0

    def __post_init__(self) -> None:
        lo, hi = self.age_years
        if not 0 <= lo <= hi <= 110:
            raise ValueError(f"age_years must be an increasing range within 0-110, got {self.age_years}")
        if not 0.0 <= self.degeneration <= 5.0:
            raise ValueError(f"degeneration must be between 0 and 5, got {self.degeneration}")
        for name in ("opll", "tumor_free_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")
        unknown = set(self.subtype_weights) - {s.value for s in TumorSubtype}
        if unknown or any(w < 0 for w in self.subtype_weights.values()):
            raise ValueError(f"subtype_weights need known subtypes and weights >= 0, got {dict(self.subtype_weights)}")
        if not 0.3 <= self.lesion_size <= 3.0:
            raise ValueError(f"lesion_size must be between 0.3 and 3, got {self.lesion_size}")

    def subtype_frequency(self, subtype: TumorSubtype) -> float:
        """The subtype's relative frequency at this site."""
        return SUBTYPES[subtype].frequency * self.subtype_weights.get(subtype.value, 1.0)

    def class_shares(self) -> dict[str, float]:
        """Expected share of each class among tumour cases drawn at random."""
        totals = {c.value: 0.0 for c in TumorClass}
        for subtype, spec in SUBTYPES.items():
            totals[spec.tumor_class.value] += self.subtype_frequency(subtype)
        whole = sum(totals.values())
        return {c: round(v / whole, 4) for c, v in totals.items()}

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["age_years"] = list(self.age_years)
        out["subtype_weights"] = dict(self.subtype_weights)
        return out


@dataclass(frozen=True)
class SiteProfile:
    """A SYNTHETIC site: its scanners and protocols and its population."""

    name: str
    description: str
    scanner: ScannerProfile = field(default_factory=ScannerProfile)
    population: Population = field(default_factory=Population)

    @property
    def is_default(self) -> bool:
        return self.scanner == ScannerProfile() and self.population == Population()

    def fingerprint(self) -> str:
        """12 hex digits naming the profile's parameters (caches of a site's data key on it)."""
        text = json.dumps({"scanner": self.scanner.as_dict(), "population": self.population.as_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "synthetic": True,
            "scanner": self.scanner.as_dict(),
            "population": self.population.as_dict(),
        }


_DEFAULT = SiteProfile(DEFAULT_SITE, "the phantom as it always was: what the shipped models were trained on")

# Young patients' primary tumours (osteoid osteoma, osteoblastoma, aneurysmal bone cyst, giant cell tumour) and
# older patients' metastasis and myeloma set the direction of each population's subtype mix.
SITES: dict[str, SiteProfile] = {
    DEFAULT_SITE: _DEFAULT,
    "community-ct": SiteProfile(
        "community-ct",
        "a community hospital with older equipment and an older population: low-dose CT with a soft kernel, "
        "3 mm slices, coarser pixels and a drifted HU scale; 1.5 T MR with 4 mm slices and older sequences; a "
        "noisier, blurrier, flatter radiograph; patients 55-85 with more disc degeneration and OPLL, more "
        "metastasis and myeloma, many incidental hemangiomas, few tumours of the young",
        ScannerProfile(
            ct=Protocol(noise=3.0, resolution=1.3, contrast=0.92, thickness_mm=3.0, blur_mm=0.9, kernel_name="B20s"),
            mr=Protocol(noise=2.5, resolution=1.2, thickness_mm=4.0, blur_mm=0.5),
            xr=Protocol(noise=4.0, blur_mm=0.3, contrast=0.8),
            mr_field_t=1.5,
            mr_weighting=0.15,
        ),
        Population(
            age_years=(55, 85),
            degeneration=2.2,
            opll=0.25,
            tumor_free_share=0.25,
            subtype_weights={
                "metastasis": 2.0,
                "myeloma": 2.0,
                "hemangioma": 4.0,
                "osteoid_osteoma": 0.2,
                "osteoblastoma": 0.3,
                "aneurysmal_bone_cyst": 0.2,
                "giant_cell_tumor": 0.5,
            },
        ),
    ),
    "mr-1p5t": SiteProfile(
        "mr-1p5t",
        "a spine clinic imaging mostly by 1.5 T MR: lower MR SNR, a different T1/T2 weighting, coarser pixels and 4 mm "
        "slices; a standard CT; a younger population (15-45) with more primary benign and borderline tumours, fewer "
        "metastases, found earlier and so smaller",
        ScannerProfile(
            ct=Protocol(noise=1.3),
            mr=Protocol(noise=2.2, resolution=1.25, thickness_mm=4.0, blur_mm=0.5),
            xr=Protocol(noise=1.3),
            mr_field_t=1.5,
            mr_weighting=0.3,
        ),
        Population(
            age_years=(15, 45),
            degeneration=0.5,
            opll=0.04,
            tumor_free_share=0.25,
            subtype_weights={
                "osteoid_osteoma": 2.0,
                "osteoblastoma": 2.0,
                "aneurysmal_bone_cyst": 2.0,
                "giant_cell_tumor": 1.5,
                "schwannoma": 1.5,
                "metastasis": 0.3,
                "myeloma": 0.3,
            },
            lesion_size=0.75,
        ),
    ),
    "high-res-sharp": SiteProfile(
        "high-res-sharp",
        "a tertiary spine-tumour centre with current scanners: thin-slice CT (1 mm) on finer pixels with a sharp "
        "bone kernel, 3 T MR with higher SNR and edge enhancement, an edge-enhanced radiograph; referred "
        "patients 30-75 with more primary bone tumours (giant cell tumour, aneurysmal bone cyst, osteoblastoma, "
        "chordoma), fewer incidental hemangiomas and metastases, larger at referral",
        ScannerProfile(
            ct=Protocol(noise=1.2, resolution=0.8, thickness_mm=1.0, sharpen=1.5, sharpen_mm=0.8, kernel_name="B70s"),
            mr=Protocol(noise=0.7, resolution=0.8, sharpen=0.8, sharpen_mm=0.8),
            xr=Protocol(sharpen=1.5, sharpen_mm=1.0, contrast=1.2),
            mr_field_t=3.0,
        ),
        Population(
            age_years=(30, 75),
            degeneration=1.3,
            opll=0.15,
            tumor_free_share=0.15,
            subtype_weights={
                "giant_cell_tumor": 4.0,
                "aneurysmal_bone_cyst": 2.5,
                "osteoblastoma": 1.5,
                "chordoma": 1.5,
                "hemangioma": 0.4,
                "osteochondroma": 0.5,
                "metastasis": 0.6,
            },
            lesion_size=1.3,
        ),
    ),
}


def get_site(name: str) -> SiteProfile:
    """The profile called ``name``; an unknown name is a ValueError listing the known ones."""
    try:
        return SITES[name]
    except KeyError:
        raise ValueError(f"unknown site {name!r}: known sites are {', '.join(SITES)}") from None
