"""What a labelled segment is, read from its codes: a DICOM SEG segment's Segmented Property Type (and, for a
vertebral body, its Anatomic Region: the vertebra) becomes one of cspine's structures, then a label of each
modality's model table (``SEG_LABELS``).

The standard codes are the ones cspine writes in its own SEG (``dicom.outputs.SEGMENT_CODES``): SNOMED CT where
DICOM has a code, and ``99CSPINE`` nowhere else. A site whose annotation tool writes other codes maps them in
``codes.csv`` at the cohort's root (``scheme,code,structure[,level]``, docs/cohort.md); a code neither knows is an
error of ``cspine cohort check``, never guessed.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from cspine.dicom.outputs import DISC_BELOW, LEVEL_CODES, SEGMENT_CODES
from cspine.domain import VERTEBRAL_LEVELS, Modality
from cspine.errors import InvalidInputError
from cspine.inference.specs import SEG_LABELS

CODES_FILE = "codes.csv"
# cspine's structures, whatever the modality; each modality's model keeps those it segments (``model_label``).
STRUCTURES = ("vertebral_body", "posterior_elements", "disc", "canal", "csf", "cord", "opll", "tumor")
# Where segments overlap, the later structure wins a voxel.
PAINT_ORDER = STRUCTURES
XR_BODY_LEVELS = ("C2", "C3", "C4", "C5", "C6", "C7")  # the radiograph model labels these bodies one by one


@dataclass(frozen=True)
class Meaning:
    """A segment's structure, and its vertebra when the codes say which (vertebral bodies)."""

    structure: str
    level: str | None = None


def _key(scheme: str, value: str) -> tuple[str, str]:
    return scheme.strip().upper(), value.strip()


def _standard() -> dict[tuple[str, str], str]:
    """Type code → structure, from the codes cspine writes (c2_body … t1_body share the vertebral body code), and
    the disc of each cervical level (C2/C3 … C7/T1 disc)."""
    table: dict[tuple[str, str], str] = {}
    for name, code in SEGMENT_CODES.items():
        structure = "vertebral_body" if name.endswith("_body") else name
        table[_key(code.type.scheme_designator, code.type.value)] = structure
    for _, disc in DISC_BELOW.values():
        table[_key(disc.scheme_designator, disc.value)] = "disc"
    return table


STANDARD = _standard()
LEVEL_OF_REGION = {_key(code.scheme_designator, code.value): level for level, code in LEVEL_CODES.items()}


@dataclass(frozen=True)
class CodeMap:
    """The standard codes and a site's own (``codes.csv``), which take precedence."""

    site: dict[tuple[str, str], Meaning]

    @classmethod
    def load(cls, cohort: Path) -> CodeMap:
        """The cohort's code map: the standard one, plus ``cohort/codes.csv`` when there is one.
        ``InvalidInputError`` names a row that is not ``scheme,code,structure[,level]`` with a known structure
        and level."""
        path = cohort / CODES_FILE
        if not path.exists():
            return cls({})
        site: dict[tuple[str, str], Meaning] = {}
        with path.open(newline="", encoding="utf-8-sig") as f:
            for number, row in enumerate(csv.DictReader(f), start=2):
                scheme, value = (row.get("scheme") or "").strip(), (row.get("code") or "").strip()
                structure, level = (row.get("structure") or "").strip(), (row.get("level") or "").strip() or None
                if not scheme or not value:
                    raise InvalidInputError(f"{CODES_FILE} line {number}: 'scheme' and 'code' are required")
                if structure not in STRUCTURES:
                    raise InvalidInputError(
                        f"{CODES_FILE} line {number}: structure {structure!r} is not one of {', '.join(STRUCTURES)}"
                    )
                if level is not None and level not in VERTEBRAL_LEVELS:
                    raise InvalidInputError(
                        f"{CODES_FILE} line {number}: level {level!r} is not one of {', '.join(VERTEBRAL_LEVELS)}"
                    )
                site[_key(scheme, value)] = Meaning(structure, level)
        return cls(site)

    def meaning(self, type_code: tuple[str, str], region: tuple[str, str] | None) -> Meaning | None:
        """What a segment with this Segmented Property Type (scheme, value) and Anatomic Region is; None when
        neither the site's codes nor the standard ones know the type."""
        key = _key(*type_code)
        if key in self.site:
            return self.site[key]
        structure = STANDARD.get(key)
        if structure is None:
            return None
        level = LEVEL_OF_REGION.get(_key(*region)) if region is not None and structure == "vertebral_body" else None
        return Meaning(structure, level)


def model_label(modality: Modality, meaning: Meaning) -> tuple[str | None, str]:
    """The label of ``modality``'s model table a structure is trained as, or None with the reason it is not used
    there. CT has one canal (CSF and cord together); the radiograph tells C2 … C7 bodies apart."""
    names = SEG_LABELS[modality]
    structure = meaning.structure
    if modality is Modality.CT and structure in ("csf", "cord"):
        return "canal", ""
    if modality is Modality.XR and structure == "vertebral_body":
        if meaning.level in XR_BODY_LEVELS:
            return f"{meaning.level.lower()}_body", ""
        return "other_body", ""
    if structure in names:
        return structure, ""
    if modality is Modality.MR and structure == "canal":
        return None, "MR segments CSF and cord, not the canal as one structure"
    return None, f"the {modality.value} model does not segment {structure}"
