"""Coverage-guided fuzzing of DICOM ingest (atheris, i.e. libFuzzer over Python): damaged Part-10 files and
multi-instance uploads must become a Study or a CspineError with a message — never another exception, a
MemoryError or a hang. ``cspine fuzz ingest`` runs it for a CPU budget; docs/reliability.md has the figures.

Two processes. The *supervisor* (:func:`fuzz_ingest`) prepares seeds, starts a *worker*
(``python -m cspine.dicom.fuzz``, libFuzzer's command line), restarts it after a crash that kills it (a hang
past the per-input limit, an out-of-memory, a native abort), sums CPU time and executions, then has
libFuzzer's merge keep the smallest set of inputs that covers everything seen, and writes that corpus back.
A Python exception other than a CspineError does not stop the worker: it saves the input and the traceback
under ``crashes/`` and goes on, so one run counts every crash it finds.

This module imports no pydicom and nothing of ingest at import time: the worker imports them under atheris'
bytecode instrumentation, which only sees modules imported inside it.

An input is one Part-10 file, or a *bundle* of several (an upload of one study): ``BUNDLE_MAGIC``, then for
each instance a little-endian uint32 length and that many bytes (a length past the end takes the rest).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import resource
import shlex
import shutil
import struct
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cspine.config import IngestLimits

logger = logging.getLogger(__name__)

__all__ = ["BUNDLE_MAGIC", "FUZZ_LIMITS", "FuzzOptions", "FuzzReport", "format_report", "fuzz_ingest", "pack", "unpack"]

BUNDLE_MAGIC = b"CSPINE-FUZZ-BUNDLE\n"
_MAX_BUNDLE_INSTANCES = 16

#: Limits the fuzzer ingests under (as tests/test_ingest_fuzz.py): a header that claims a huge image is refused
#: before it costs time, and the per-input time limit measures ingest, not memset of a 1.6 GB volume.
FUZZ_LIMITS = IngestLimits(max_study_voxels=20_000_000, max_frame_bytes=16 * 1024 * 1024)

# Seeds larger than _SEED_CROP_BYTES are cropped when ingest makes the same of the cropped file (a smaller
# corpus, faster executions); ones still larger than _SEED_MAX_BYTES are left out.
_SEED_CROP_BYTES = 16 * 1024
_SEED_MAX_BYTES = 64 * 1024
_WORKER_MODULE = "cspine.dicom.fuzz"
_HEX_NAME = re.compile(r"^[0-9a-f]{40}$")
# libFuzzer's artifact prefixes of inputs that killed the worker (slow-unit- is a report, not a crash).
_DEADLY_PREFIXES = ("crash-", "timeout-", "oom-", "leak-")
_SEED_EXTENSION = ".dcm"


# --------------------------------------------------------------------------------------------------------
# Inputs


def pack(instances: Iterable[bytes]) -> bytes:
    """A bundle of instances (see the module docstring)."""
    return BUNDLE_MAGIC + b"".join(struct.pack("<I", len(data)) + data for data in instances)


def unpack(data: bytes) -> list[tuple[str, bytes]]:
    """The ``(label, bytes)`` items of an input: one instance, or the instances of a bundle."""
    if not data.startswith(BUNDLE_MAGIC):
        return [("instance 1", data)]
    items: list[tuple[str, bytes]] = []
    position = len(BUNDLE_MAGIC)
    while position + 4 <= len(data) and len(items) < _MAX_BUNDLE_INSTANCES:
        (length,) = struct.unpack_from("<I", data, position)
        position += 4
        items.append((f"instance {len(items) + 1}", data[position : position + length]))
        position += length
    return items


def _members(data: bytes) -> list[bytes]:
    return [item for _, item in unpack(data)]


# --------------------------------------------------------------------------------------------------------
# DICOM-aware mutations, on the bytes (damaged files included): no parser, so a mutation never depends on
# the input still being readable.

# The header attributes ingest reads, and the structure around them.
_MUTATED_KEYWORDS = (
    "FileMetaInformationGroupLength",
    "MediaStorageSOPClassUID",
    "TransferSyntaxUID",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "ImageType",
    "InstanceNumber",
    "SeriesNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PatientOrientation",
    "ViewPosition",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "EstimatedRadiographicMagnificationFactor",
    "SliceThickness",
    "SpacingBetweenSlices",
    "EchoTime",
    "RepetitionTime",
    "RescaleSlope",
    "RescaleIntercept",
    "ModalityLUTSequence",
    "LUTDescriptor",
    "LUTData",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "FrameIncrementPointer",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "PlanePositionSequence",
    "PlaneOrientationSequence",
    "PixelMeasuresSequence",
    "PixelValueTransformationSequence",
    "DirectoryRecordSequence",
    "PixelData",
    "FloatPixelData",
    "DoubleFloatPixelData",
)
_ITEM_TAGS = (0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD)  # Item, Item Delimitation, Sequence Delimitation
_VRS = frozenset(
    v.encode()
    for v in "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT "
    "UV".split()
)
_LONG_VRS = frozenset(v.encode() for v in "OB OD OF OL OV OW SQ UC UN UR UT UV".split())
_UNDEFINED = 0xFFFFFFFF

_INTERESTING_INTS = (0, 1, 2, 3, 4, 7, 8, 9, 12, 15, 16, 17, 24, 31, 32, 33, 63, 64, 65, 127, 128, 255, 256, 4096,
                     32767, 32768, 65535, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)  # fmt: skip
_TEXT_VALUES = {
    "IS": ("0", "1", "2", "3", "-1", "8", "255", "65536", "2147483648", "99999999999", "1.5", "", " ", "NaN", "1e3",
           "+1", "1\\2"),
    "DS": ("0", "-0", "1", "-1", "0.5", "1e308", "-1e308", "1e-320", "NaN", "inf", "-inf", "1\\1", "0\\0", "0\\0\\0",
           "1\\0\\0\\0\\1\\0", "0\\1\\0\\0\\0\\-1", "1\\0\\0\\1\\0\\0", "1\\1\\1\\1\\1\\1", "nan\\nan", "", "\\",
           "1\\2\\3\\4\\5\\6\\7", "3.4e38", "0.001\\0.001", "1e10\\1e10"),
    "CS": ("CT", "MR", "DX", "CR", "US", "SEG", "SR", "RTDOSE", "OT", "", "MONOCHROME1", "MONOCHROME2", "RGB",
           "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", "A\\F", "L\\H", "A\\A", "P\\FL", "LAT", "LL", "AP",
           "ORIGINAL\\PRIMARY\\LOCALIZER", "XXXXXXXXXXXXXXXXX"),
    "UI": ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
           "1.2.840.10008.1.2.1.98", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
           "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90",
           "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.203", "1.2.840.10008.1.2.5",
           "1.2.840.10008.1.2.4.100", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1",
           "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.1.1",
           "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.11",
           "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.1.3.10", "1.2.840.10008.5.1.4.1.1.481.2", "1.2.3", "", "x"),
}  # fmt: skip
_TEXT_VALUES["other"] = _TEXT_VALUES["CS"]


@dataclass(frozen=True)
class _Element:
    """Where one data element lies in the bytes."""

    start: int
    length_at: int
    length_size: int  # 2 (explicit VR, short) or 4
    value_at: int
    length: int
    big_endian: bool
    vr: bytes | None  # None for implicit VR and item tags

    @property
    def order(self) -> str:
        return ">" if self.big_endian else "<"

    def value_end(self, size: int) -> int:
        return min(size, self.value_at + self.length)


def _element_at(data: bytes, at: int, big_endian: bool) -> _Element | None:
    order = ">" if big_endian else "<"
    vr = data[at + 4 : at + 6]
    try:
        if vr in _VRS:
            if vr in _LONG_VRS:
                (length,) = struct.unpack_from(order + "I", data, at + 8)
                return _Element(at, at + 8, 4, at + 12, length, big_endian, vr)
            (length,) = struct.unpack_from(order + "H", data, at + 6)
            return _Element(at, at + 6, 2, at + 8, length, big_endian, vr)
        (length,) = struct.unpack_from(order + "I", data, at + 4)
        return _Element(at, at + 4, 4, at + 8, length, big_endian, None)
    except struct.error:
        return None


def _find(data: bytes, tag: int, limit: int = 8) -> list[_Element]:
    """Occurrences of a tag, little- and big-endian (a few may lie in pixel data by chance: harmless)."""
    found: list[_Element] = []
    for big_endian in (False, True):
        pattern = struct.pack(">HH" if big_endian else "<HH", tag >> 16, tag & 0xFFFF)
        at = data.find(pattern)
        while at >= 0 and len(found) < limit:
            element = _element_at(data, at, big_endian)
            if element is not None:
                found.append(element)
            at = data.find(pattern, at + 1)
    return found


def _replace_value(data: bytes, element: _Element, value: bytes, fix_length: bool = True) -> bytes | None:
    if element.length == _UNDEFINED:
        return None
    head = data[: element.value_at]
    if fix_length:
        if len(value) >= 1 << (8 * element.length_size):
            return None
        size_code = "H" if element.length_size == 2 else "I"
        length = struct.pack(element.order + size_code, len(value))
        head = head[: element.length_at] + length + head[element.length_at + element.length_size :]
    return head + value + data[element.value_end(len(data)) :]


def _text_bytes(text: str, pad: bytes, rng: random.Random) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 and rng.random() < 0.9 else raw


def _nudged_text(old: bytes, rng: random.Random) -> str:
    """The old value with one digit changed, a component added or one dropped."""
    text = old.decode("ascii", "replace").rstrip(" \x00")
    digits = [i for i, c in enumerate(text) if c.isdigit()]
    choice = rng.random()
    if digits and choice < 0.6:
        i = rng.choice(digits)
        return text[:i] + rng.choice("0123456789") + text[i + 1 :]
    if choice < 0.8:
        return text + "\\" + rng.choice(("0", "1", "-1", "1e9"))
    return "\\".join(text.split("\\")[:-1])


@dataclass(frozen=True)
class _Target:
    """A tag to mutate and what kind of value it holds."""

    tag: int
    vr: str  # the dictionary VR


_TARGETS_CACHE: list[_Target] = []


def _tag_of(keyword: str) -> int:
    """The tag of a keyword this module names, from pydicom's dictionary (imported by then)."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"{keyword} is not a DICOM keyword")
    return tag


def _targets() -> list[_Target]:
    """The mutated attributes, looked up by keyword in pydicom's dictionary (imported by then)."""
    if not _TARGETS_CACHE:
        from pydicom.datadict import dictionary_VR

        for keyword in _MUTATED_KEYWORDS:
            tag = _tag_of(keyword)
            _TARGETS_CACHE.append(_Target(tag, dictionary_VR(tag).split(" ")[0]))
        _TARGETS_CACHE.extend(_Target(tag, "item") for tag in _ITEM_TAGS)
    return _TARGETS_CACHE


def _new_value(target: _Target, element: _Element, data: bytes, rng: random.Random) -> bytes:
    old = data[element.value_at : element.value_end(len(data))]
    if target.vr in ("US", "SS", "UL", "SL", "AT"):
        width = 4 if target.vr in ("UL", "SL", "AT") else 2
        count = max(1, len(old) // width) if rng.random() < 0.8 else rng.choice((0, 1, 2, 3))
        values = [rng.choice(_INTERESTING_INTS) if rng.random() < 0.8 else rng.getrandbits(16) for _ in range(count)]
        return b"".join(struct.pack(element.order + ("I" if width == 4 else "H"), v % (1 << (8 * width)))
                        for v in values)  # fmt: skip
    if target.vr in ("OB", "OW", "OF", "OD", "UN"):
        return old[: rng.randrange(len(old) + 1)] if old else b"\x00" * rng.choice((1, 2, 8))
    pad = b"\x00" if target.vr == "UI" else b" "
    if old and rng.random() < 0.3:
        return _text_bytes(_nudged_text(old, rng), pad, rng)
    return _text_bytes(rng.choice(_TEXT_VALUES.get(target.vr, _TEXT_VALUES["other"])), pad, rng)


def _mutate_element(data: bytes, rng: random.Random) -> bytes | None:
    """Change the value, VR or length of a header attribute, or drop or repeat the whole element."""
    targets = _targets()
    for _ in range(4):
        target = rng.choice(targets)
        elements = _find(data, target.tag)
        if elements:
            break
    else:
        return None
    element = rng.choice(elements)
    how = rng.random()
    if how < 0.55 and target.vr not in ("SQ", "item"):
        return _replace_value(data, element, _new_value(target, element, data, rng), fix_length=rng.random() < 0.85)
    if how < 0.65 and element.vr is not None:
        vr = rng.choice(sorted(_VRS))
        return data[: element.start + 4] + vr + data[element.start + 6 :]
    if how < 0.85:
        lengths = (0, 1, 2, 4, 6, 8, 0xFFFF, _UNDEFINED, 0x7FFFFFFF, element.length + 1, element.length - 1,
                   element.length * 2, len(data))  # fmt: skip
        size_code = "H" if element.length_size == 2 else "I"
        length = rng.choice(lengths) % (1 << (8 * element.length_size))
        packed = struct.pack(element.order + size_code, length)
        return data[: element.length_at] + packed + data[element.length_at + element.length_size :]
    if element.length == _UNDEFINED:
        return None
    end = element.value_end(len(data))
    if how < 0.93:
        return data[: element.start] + data[end:]  # drop it
    return data[:end] + data[element.start : end] + data[end:]  # repeat it


# Codestream headers inside encapsulated pixel data: (marker, offset of the 16-bit size fields after it).
_CODESTREAM_MARKERS = ((b"\xff\xc0", 5), (b"\xff\xc1", 5), (b"\xff\xc3", 5), (b"\xff\xf7", 5), (b"\xff\x51", 6))


def _mutate_codestream(data: bytes, rng: random.Random) -> bytes | None:
    """Change the size or component fields of a JPEG / JPEG-LS / JPEG 2000 frame header: the decoders size
    their buffers from these, not from the DICOM header."""
    hits = [(at, offset) for marker, offset in _CODESTREAM_MARKERS if (at := data.find(marker, 132)) >= 0]
    if not hits:
        return None
    at, offset = rng.choice(hits)
    field_at = at + 2 + offset + 2 * rng.randrange(4)
    if field_at + 2 > len(data):
        return None
    value = struct.pack(">H", rng.choice(_INTERESTING_INTS) & 0xFFFF)
    return data[:field_at] + value + data[field_at + 2 :]


def _set_text(data: bytes, keyword: str, text: str) -> bytes:
    for element in _find(data, _tag_of(keyword), limit=2)[:1]:
        pad = b"\x00" if keyword.endswith("UID") else b" "
        raw = text.encode("ascii", "replace")
        replaced = _replace_value(data, element, raw + pad if len(raw) % 2 else raw)
        if replaced is not None:
            return replaced
    return data


def _get_text(data: bytes, keyword: str) -> str | None:
    for element in _find(data, _tag_of(keyword), limit=1):
        if element.length != _UNDEFINED:
            value = data[element.value_at : min(element.value_end(len(data)), element.value_at + 64)]
            return value.decode("ascii", "replace").rstrip(" \x00")
    return None


def _series_of(data: bytes, rng: random.Random) -> bytes:
    """A bundle of copies of one instance made into a series: new SOPInstanceUIDs and InstanceNumbers, slice
    positions along z (regular, repeated, with a gap or reversed), and now and then one odd instance out."""
    count = rng.randint(2, 6)
    step = rng.choice((1.0, 2.5, 0.0, 0.004, -3.0, 1e-9))
    gap = rng.randrange(count + 2)
    copies = []
    for k in range(count):
        copy = _set_text(data, "SOPInstanceUID", f"1.2.826.0.1.3680043.10.1234.{rng.getrandbits(24)}.{k}")
        z = (k + (k >= gap)) * step
        copy = _set_text(copy, "ImagePositionPatient", f"0\\0\\{z:g}")
        number = (k + 1, count - k, 1)[rng.randrange(3)]
        copy = _set_text(copy, "InstanceNumber", str(number))
        copies.append(copy)
    if rng.random() < 0.4:
        odd = rng.randrange(count)
        keyword, value = rng.choice(
            (
                ("ImageOrientationPatient", "0\\1\\0\\0\\0\\-1"),
                ("PixelSpacing", "0.7\\0.7"),
                ("Modality", "MR"),
                ("StudyInstanceUID", "1.2.3.4"),
                ("SeriesInstanceUID", "1.2.3.5"),
                ("NumberOfFrames", "2"),
                ("PhotometricInterpretation", "RGB"),
                ("SOPInstanceUID", "1.2.3.6"),
            )
        )
        copies[odd] = _set_text(copies[odd], keyword, value)
    return pack(copies)


def _mutate_instance(data: bytes, max_size: int, rng: random.Random, generic: Callable[[bytes, int], bytes]) -> bytes:
    """One mutation of one instance's bytes."""
    choice = rng.random()
    result: bytes | None = None
    if choice < 0.30:
        result = generic(data, max_size)  # libFuzzer's own: bit flips, inserts, erases, dictionary words …
    elif choice < 0.70:
        result = _mutate_element(data, rng)
    elif choice < 0.75:
        result = data[: rng.randrange(len(data) + 1)]
    elif choice < 0.82:
        result = _mutate_codestream(data, rng)
    elif choice < 0.88:
        at = rng.randrange(len(data) + 1)
        run = rng.choice((b"\x00", b"\xff", b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0")) * rng.randint(1, 16)
        result = data[:at] + run + data[at + len(run) :]
    else:
        result = _series_of(data, rng)
    return result if result is not None else generic(data, max_size)


def mutate(data: bytes, max_size: int, seed: int, generic: Callable[[bytes, int], bytes]) -> bytes:
    """libFuzzer's custom mutator: one instance, or one member (or the make-up) of a bundle."""
    rng = random.Random(seed)
    if not data.startswith(BUNDLE_MAGIC):
        return _mutate_instance(data, max_size, rng, generic)[:max_size]
    members = _members(data) or [b""]
    k = rng.randrange(len(members))
    choice = rng.random()
    if choice < 0.6:
        members[k] = _mutate_instance(members[k], max_size, rng, generic)
    elif choice < 0.7 and len(members) > 1:
        del members[k]
    elif choice < 0.8:
        members.insert(rng.randrange(len(members) + 1), members[k])  # a repeated instance
    elif choice < 0.9:
        rng.shuffle(members)
    elif choice < 0.95:
        return members[k][:max_size]
    else:
        return generic(data, max_size)[:max_size]
    return pack(members[:_MAX_BUNDLE_INSTANCES])[:max_size]


def crossover(first: bytes, second: bytes, max_size: int, seed: int) -> bytes:
    """libFuzzer's custom crossover: an upload of both inputs' instances, or the head of one joined to the
    tail of the other."""
    rng = random.Random(seed)
    if rng.random() < 0.5:
        members = (_members(first) + _members(second))[:_MAX_BUNDLE_INSTANCES]
        study = _get_text(members[0], "StudyInstanceUID") if rng.random() < 0.7 else None
        if study:  # mostly one study, or ingest refuses the upload at its second instance
            members = [_set_text(m, "StudyInstanceUID", study) for m in members]
        return pack(members)[:max_size]
    return (first[: rng.randrange(len(first) + 1)] + second[rng.randrange(len(second) + 1) :])[:max_size]


def _dictionary_text() -> str:
    """A libFuzzer dictionary: tags (with their VR) of the mutated attributes, VRs, item tags, magic bytes."""

    def entry(raw: bytes) -> str:
        return '"' + "".join(f"\\x{b:02x}" for b in raw) + '"'

    words = {b"DICM", b"\xff\xd8\xff", b"\xff\x4f\xff\x51", BUNDLE_MAGIC}
    for target in _targets():
        group, element = target.tag >> 16, target.tag & 0xFFFF
        words.add(struct.pack("<HH", group, element))
        words.add(struct.pack(">HH", group, element))
        if target.vr not in ("item",) and len(target.vr) == 2:
            words.add(struct.pack("<HH", group, element) + target.vr.encode())
    words.update(_VRS)
    words.update(v.encode() for v in _TEXT_VALUES["UI"] if v)
    return "\n".join(entry(w) for w in sorted(words)) + "\n"


# --------------------------------------------------------------------------------------------------------
# The worker (libFuzzer inside this process)


@dataclass(frozen=True)
class _WorkerConfig:
    crashes: str  # folder for Python crashes (libFuzzer's own artifacts go there too)
    stats: str  # JSON file the worker keeps its counts in
    cpu_budget_s: float | None  # stop once the process has used this much CPU (None: libFuzzer decides)


class _Worker:
    """Runs each input through ingest, counts outcomes, saves crashes, stops at its CPU budget."""

    def __init__(self, config: _WorkerConfig, ingest: Callable, error_type: type) -> None:
        self.config = config
        self.ingest = ingest
        self.error_type = error_type
        self.executions = 0
        self.outcomes: Counter[str] = Counter()
        self.crashes: dict[str, str] = {}  # sha1 → signature
        self.slowest_s = 0.0
        self.slowest_sha1 = ""
        self._written_at = 0.0

    def __call__(self, data: bytes) -> None:
        started = time.perf_counter()
        try:
            study = self.ingest(unpack(data), FUZZ_LIMITS)
            for series in study.series:
                if series.volume is not None:
                    assert series.volume.voxels.shape[0] == len(series.volume.slice_offsets)
            self.outcomes["Study"] += 1
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # a Rust decoder's panic is a BaseException
            if isinstance(exc, self.error_type) and str(exc):
                self.outcomes[type(exc).__name__] += 1
            else:
                self._save_crash(data, exc)
        elapsed = time.perf_counter() - started
        self.executions += 1
        if elapsed > self.slowest_s:
            self.slowest_s, self.slowest_sha1 = elapsed, hashlib.sha1(data).hexdigest()
        now = time.monotonic()
        if now - self._written_at > 2.0:
            self.write_stats(finished=False)
            self._written_at = now
        if self.config.cpu_budget_s is not None and time.process_time() >= self.config.cpu_budget_s:
            self.write_stats(finished=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)  # libFuzzer has written every new input already; there is nothing else to flush

    def _save_crash(self, data: bytes, exc: BaseException) -> None:
        sha1 = hashlib.sha1(data).hexdigest()
        frames = traceback.extract_tb(exc.__traceback__)
        where = next((f for f in reversed(frames) if "/cspine/" in f.filename), frames[-1] if frames else None)
        signature = (
            f"{type(exc).__name__} at {Path(where.filename).name}:{where.lineno}" if where else type(exc).__name__
        )
        if isinstance(exc, self.error_type):
            signature = f"{type(exc).__name__} with an empty message"
        self.outcomes["crash"] += 1
        if sha1 in self.crashes:
            return
        self.crashes[sha1] = signature
        folder = Path(self.config.crashes)
        (folder / f"python-{sha1}").write_bytes(data)
        text = "".join(traceback.format_exception(exc))
        (folder / f"python-{sha1}.txt").write_text(f"{signature}\n\n{text}")

    def write_stats(self, finished: bool) -> None:
        stats = {
            "executions": self.executions,
            "cpu_s": time.process_time(),
            "outcomes": dict(self.outcomes),
            "crashes": self.crashes,
            "slowest_s": self.slowest_s,
            "slowest_sha1": self.slowest_sha1,
            "finished": finished,
        }
        path = Path(self.config.stats)
        path.with_suffix(".tmp").write_text(json.dumps(stats))
        path.with_suffix(".tmp").replace(path)


# pydicom modules ingest reaches lazily (decoder plugins, encapsulation): imported up front so that atheris
# instruments them too.
_LAZY_MODULES = (
    "pydicom.encaps",
    "pydicom.pixels.decoders.base",
    "pydicom.pixels.decoders.pylibjpeg",
    "pydicom.pixels.decoders.pyjpegls",
    "pydicom.pixels.decoders.rle",
    "pydicom.pixels.decoders.pillow",
    "pydicom.pixels.processing",
    "pydicom.pixels.utils",
    "pydicom.overlays",
)


def _worker_main(argv: list[str]) -> None:
    """``python -m cspine.dicom.fuzz --config=FILE <libFuzzer flags> <corpus folders>``."""
    import importlib
    import warnings

    import atheris

    config_path = next(a.split("=", 1)[1] for a in argv if a.startswith("--config="))
    config = _WorkerConfig(**json.loads(Path(config_path).read_text()))
    warnings.simplefilter("ignore")  # pydicom warns on most damaged inputs; the warnings cost time, not safety
    logging.disable(logging.CRITICAL)
    # Turn a runaway allocation into a MemoryError (a crash with a traceback) before the machine runs out.
    resource.setrlimit(resource.RLIMIT_AS, (8 * 1024**3, resource.RLIM_INFINITY))
    with atheris.instrument_imports(include=["cspine", "pydicom"]):
        import pydicom  # noqa: F401

        from cspine.dicom.ingest import ingest
        from cspine.errors import CspineError

        for name in _LAZY_MODULES:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
    worker = _Worker(config, ingest, CspineError)

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        try:
            return mutate(data, max_size, seed, atheris.Mutate)
        except Exception:  # a fault of the mutator is not one of ingest: never let it count as a crash
            return atheris.Mutate(data, max_size)

    def custom_crossover(first: bytes, second: bytes, max_size: int, seed: int) -> bytes:
        try:
            return crossover(first, second, max_size, seed)
        except Exception:
            return first[:max_size]

    # libFuzzer's merge starts this command again in a shell: argv[0] must be a command line, not a path.
    command = f"{shlex.quote(sys.executable)} -m {_WORKER_MODULE}"
    atheris.Setup([command, *argv[1:]], worker, custom_mutator=custom_mutator, custom_crossover=custom_crossover)
    worker.write_stats(finished=False)
    atheris.Fuzz()  # never returns: libFuzzer ends the process (the worker itself at its CPU budget)


# --------------------------------------------------------------------------------------------------------
# Seeds


def _crop(ds: Any, rows: int = 16, columns: int = 16, frames: int = 2) -> None:
    """Crop an image to at most rows × columns × frames, re-encoded in its own transfer syntax (raises when
    pydicom cannot decode or re-encode it)."""
    import numpy as np

    syntax = ds.file_meta.TransferSyntaxUID
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples > 1 and not syntax.is_compressed and str(ds.get("PhotometricInterpretation", "")).startswith("YBR"):
        raise ValueError("native YBR pixel data would need converting back")
    arr = ds.pixel_array
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if count > 1:
        arr = arr[:frames]
        count = arr.shape[0]
    arr = np.ascontiguousarray(arr[..., :rows, :columns, :] if samples > 1 else arr[..., :rows, :columns])
    ds.Rows, ds.Columns = (int(n) for n in (arr.shape[-3:-1] if samples > 1 else arr.shape[-2:]))
    if "NumberOfFrames" in ds:
        ds.NumberOfFrames = count
    if "PerFrameFunctionalGroupsSequence" in ds:
        ds.PerFrameFunctionalGroupsSequence = ds.PerFrameFunctionalGroupsSequence[:count]
    for keyword in ("IconImageSequence", "LargestImagePixelValue", "SmallestImagePixelValue"):
        if keyword in ds:
            del ds[keyword]
    if syntax.is_compressed:
        ds.compress(syntax, arr)
    elif ds.BitsAllocated == 1:
        from pydicom.pixels import pack_bits

        ds.PixelData = pack_bits(arr)
    else:
        ds.PixelData = arr.astype(arr.dtype.newbyteorder("<" if syntax.is_little_endian else ">")).tobytes()


def _outcome(data: bytes) -> str:
    """What ingest makes of an input, as a class: "Study", the CspineError's type, or "crash"."""
    from cspine.dicom.ingest import ingest
    from cspine.errors import CspineError

    try:
        ingest(unpack(data), FUZZ_LIMITS)
    except CspineError as exc:
        return type(exc).__name__
    except Exception:
        return "crash"
    return "Study"


def _reduced(path: Path) -> bytes | None:
    """A corpus file as a seed: as it is when small, else cropped when ingest makes the same of the cropped
    file (None when it cannot be made small)."""
    import io
    import warnings

    import pydicom

    data = path.read_bytes()
    if len(data) <= _SEED_CROP_BYTES:
        return data
    original = data if len(data) <= _SEED_MAX_BYTES else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data))
            _crop(ds)
            buffer = io.BytesIO()
            ds.save_as(buffer)
            reduced = buffer.getvalue()
            if len(reduced) > _SEED_MAX_BYTES or _outcome(reduced) != _outcome(data):
                return original
    except Exception as exc:  # a file pydicom cannot crop (odd encodings): as it is, or left out when large
        logger.debug("seed %s not cropped: %s: %s", path.name, type(exc).__name__, exc)
        return original
    return reduced if len(reduced) < len(data) else data


def _series_bundles(paths: list[Path]) -> list[bytes]:
    """Real multi-instance uploads from the corpus: up to 4 small files of one series in a bundle."""
    import pydicom

    by_series: dict[str, list[bytes]] = {}
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            uid = str(ds.SeriesInstanceUID)
        except Exception:
            continue
        data = _reduced(path)
        if data is not None:
            by_series.setdefault(uid, []).append(data)
    return [pack(files[:4]) for files in by_series.values() if len(files) > 1]


def _phantom_seeds() -> list[bytes]:
    """A CT slice, an MR slice, the radiograph and a 3-slice CT upload of a small SYNTHETIC phantom case."""
    import tempfile

    from cspine.phantom.generate import PhantomOptions, generate_case
    from cspine.phantom.scanner import Shift

    with tempfile.TemporaryDirectory(prefix="cspine-fuzz-") as tmp:
        options = PhantomOptions(tumor="malignant", shift=Shift(resolution=4.0))
        truth = generate_case(Path(tmp) / "case", "fuzz", 5, 0, options)

        def read(role: str) -> list[bytes]:
            return [(Path(tmp) / "case" / f).read_bytes() for f in truth["series"][role]["files"]]

        ct, mr, xr = read("ct"), read("mr_t2"), read("xr")
        middle = len(ct) // 2
        return [ct[middle], mr[0], xr[0], pack(ct[middle - 1 : middle + 2])]


@contextlib.contextmanager
def _quiet(
    names: Iterable[str] = ("pydicom", "openjpeg", "cspine.dicom.ingest", "cspine.dicom.pixels"),
) -> Iterator[None]:
    """Silence the libraries' complaints while seeds are cropped (most corpus files make some)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


@_quiet()
def _prepare_seeds(folder: Path, extra: Iterable[Path]) -> dict[str, int]:
    """Write every seed into ``folder``; returns the count by source."""
    import os.path

    from pydicom.data import get_testdata_files

    folder.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()

    def write(source: str, data: bytes) -> None:
        (folder / f"{source}-{hashlib.sha1(data).hexdigest()[:16]}{_SEED_EXTENSION}").write_bytes(data)
        counts[source] += 1

    corpus = sorted(Path(f) for f in get_testdata_files() if os.path.isfile(f))
    for path in corpus:
        data = _reduced(path)
        source = "pydicom" if "pydicom" in path.parts else "pydicom-data"
        if data is None:
            counts[f"{source} (too large, left out)"] += 1
        else:
            write(source, data)
    for bundle in _series_bundles([p for p in corpus if "dicomdirtests" in p.parts]):
        write("pydicom-series", bundle)
    for data in _phantom_seeds():
        write("phantom", data)
    for given in extra:
        for path in sorted(Path(given).iterdir()):
            if path.is_file() and path.stat().st_size <= _SEED_MAX_BYTES * _MAX_BUNDLE_INSTANCES:
                write("extra", path.read_bytes())
    return dict(counts)


# --------------------------------------------------------------------------------------------------------
# The supervisor


@dataclass(frozen=True)
class FuzzOptions:
    """One fuzzing run. ``budget_s`` is CPU seconds of the fuzzing workers (the final merge comes on top)."""

    budget_s: float
    corpus: Path  # the kept corpus: read as seeds, replaced by the minimized corpus at the end
    work: Path = Path("out/fuzz")
    seed: int = 1
    seeds: tuple[Path, ...] = ()  # more seed folders (tests/fuzz_seeds.py writes the test builders' files)
    per_input_timeout_s: int = 10
    max_len: int = 128 * 1024
    rss_limit_mb: int = 3072
    max_corpus_files: int = 450
    max_corpus_bytes: int = 2_500_000
    minimize: bool = True

    def __post_init__(self) -> None:
        if self.budget_s <= 0 or self.per_input_timeout_s <= 0:
            raise ValueError("the CPU budget and the per-input time limit must be positive")


@dataclass
class FuzzReport:
    """What a run did. ``crashes`` maps each crashing input's file to its signature."""

    budget_s: float
    cpu_s: float = 0.0
    merge_cpu_s: float = 0.0
    wall_s: float = 0.0
    executions: int = 0
    workers: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    crashes: dict[str, str] = field(default_factory=dict)
    slowest_s: float = 0.0
    seeds: dict[str, int] = field(default_factory=dict)
    corpus_files: int = 0
    corpus_bytes: int = 0
    corpus_features: tuple[int, int] = (0, 0)  # features beyond the seeds' kept, of those found
    versions: dict[str, str] = field(default_factory=dict)
    seed: int = 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for package in ("atheris", "pydicom", "pydicom-data", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg",
                    "pylibjpeg-rle", "pyjpegls", "numpy"):  # fmt: skip
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "absent"
    return found


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _worker_command(config_path: Path, flags: list[str], folders: list[Path]) -> list[str]:
    return [sys.executable, "-m", _WORKER_MODULE, f"--config={config_path}", *flags, *map(str, folders)]


def _write_config(path: Path, config: _WorkerConfig) -> Path:
    path.write_text(json.dumps(dataclasses.asdict(config)))
    return path


def _deadly_artifacts(crashes: Path) -> set[Path]:
    return {p for p in crashes.iterdir() if p.name.startswith(_DEADLY_PREFIXES) and p.suffix != ".txt"}


def _record_deadly(artifact: Path, log: Path) -> str:
    """Write ``artifact.txt``: the worker log after libFuzzer's last progress line — its report, with the
    Python stack atheris prints."""
    text = log.read_text(errors="replace")
    progress = list(re.finditer(r"^#\d+\t.*$", text, re.MULTILINE))
    report = text[progress[-1].end() :] if progress else text
    kind = artifact.name.split("-", 1)[0]
    signature = {"timeout": "hang (per-input time limit)", "oom": "out of memory (RSS limit)"}.get(kind, kind)
    artifact.with_name(artifact.name + ".txt").write_text(f"{signature}\n{report[-8000:]}")
    return signature


def fuzz_ingest(options: FuzzOptions, progress: Callable[[str], None] | None = None) -> FuzzReport:
    """Fuzz ingest for ``options.budget_s`` CPU seconds; see the module docstring."""
    say = progress or (lambda message: logger.info("%s", message))
    work = options.work
    seeds, new, kept, crashes, logs = (work / name for name in ("seeds", "new", "kept", "crashes", "logs"))
    for folder in (seeds, new, kept, logs):  # nothing of an earlier run may be read as this one's
        shutil.rmtree(folder, ignore_errors=True)
    for folder in (new, kept, crashes, logs):
        folder.mkdir(parents=True, exist_ok=True)
    for stale in crashes.iterdir():
        stale.unlink()
    report = FuzzReport(budget_s=options.budget_s, versions=_versions(), seed=options.seed)
    started = time.monotonic()
    say("preparing seeds")
    report.seeds = _prepare_seeds(seeds, options.seeds)
    options.corpus.mkdir(parents=True, exist_ok=True)
    for path in options.corpus.iterdir():
        if _HEX_NAME.match(path.name):
            shutil.copy(path, kept / path.name)
    report.seeds["kept corpus"] = len(list(kept.iterdir()))
    dictionary = work / "dicom.dict"
    dictionary.write_text(_dictionary_text())
    flags = [
        f"-timeout={options.per_input_timeout_s}",
        f"-report_slow_units={options.per_input_timeout_s}",
        f"-rss_limit_mb={options.rss_limit_mb}",
        f"-max_len={options.max_len}",
        "-len_control=0",
        f"-dict={dictionary}",
        f"-artifact_prefix={crashes}/",
        "-print_final_stats=1",
    ]
    cpu_before = _children_cpu_s()
    stalled = 0
    while (spent := _children_cpu_s() - cpu_before) < options.budget_s - 1.0:
        report.workers += 1
        stats = logs / f"worker-{report.workers}.json"
        log = logs / f"worker-{report.workers}.log"
        config = _write_config(
            work / "worker.json",
            _WorkerConfig(str(crashes), str(stats), cpu_budget_s=options.budget_s - spent),
        )
        before = _deadly_artifacts(crashes)
        seed_flag = f"-seed={options.seed + report.workers - 1}"
        say(f"worker {report.workers}: {options.budget_s - spent:.0f} CPU-s to go")
        with log.open("wb") as out:
            result = subprocess.run(
                _worker_command(config, [*flags, seed_flag], [new, kept, seeds]), stdout=out, stderr=subprocess.STDOUT
            )
        counts = json.loads(stats.read_text()) if stats.exists() else {}
        report.executions += counts.get("executions", 0)
        for outcome, n in counts.get("outcomes", {}).items():
            report.outcomes[outcome] = report.outcomes.get(outcome, 0) + n
        report.slowest_s = max(report.slowest_s, counts.get("slowest_s", 0.0))
        for sha1, signature in counts.get("crashes", {}).items():
            report.crashes[f"python-{sha1}"] = signature
        if counts.get("finished"):
            break
        found = _deadly_artifacts(crashes) - before
        for artifact in found:
            report.crashes[artifact.name] = _record_deadly(artifact, log)
            say(f"worker {report.workers} died on {artifact.name} (exit status {result.returncode})")
        stalled = 0 if found or counts.get("executions", 0) > 100 else stalled + 1
        if stalled >= 3:
            raise RuntimeError(f"the fuzzing worker keeps failing without a crash input; see {log}")
    report.cpu_s = _children_cpu_s() - cpu_before
    if options.minimize:
        say("minimizing the corpus (libFuzzer merge)")
        _merge_into_corpus(options, flags, seeds, [new, kept], crashes, report)
    report.wall_s = time.monotonic() - started
    (work / "report.json").write_text(json.dumps(dataclasses.asdict(report), indent=2))
    return report


def _feature_gains(control: Path) -> dict[Path, int]:
    """From libFuzzer's merge control file: each input outside the first folder (the seeds), with the number
    of coverage features it added to those of the seeds and of every input merged before it (smaller ones
    first), when it added any. The gains are disjoint: keeping a subset keeps the sum of their gains."""
    lines = control.read_text().splitlines()
    count, first = int(lines[0]), int(lines[1])
    paths = [Path(line) for line in lines[2 : 2 + count]]
    gains = {}
    for line in lines[2 + count :]:
        if line.startswith("FT "):
            index, *features = line.split()[1:]
            if int(index) >= first and features:
                gains[paths[int(index)]] = len(features)
    return gains


def _merge_into_corpus(
    options: FuzzOptions, flags: list[str], seeds: Path, found: list[Path], crashes: Path, report: FuzzReport
) -> None:
    """libFuzzer's merge measures what each input found (and each of the corpus kept before) adds to the
    seeds' coverage. The seeds come back from their packages on every run, so only inputs that add features
    are kept: every crash input first (the regression test's point), then by features added per byte, within
    the corpus' caps in files and bytes."""
    merged, control = options.work / "merged", options.work / "merge-control.txt"
    shutil.rmtree(merged, ignore_errors=True)
    shutil.copytree(seeds, merged)
    config = _write_config(
        options.work / "merge.json", _WorkerConfig(str(crashes), str(options.work / "merge-stats.json"), None)
    )
    cpu_before = _children_cpu_s()
    with (options.work / "logs" / "merge.log").open("wb") as out:
        command = _worker_command(config, [*flags, "-merge=1", f"-merge_control_file={control}"], [merged, *found])
        subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    report.merge_cpu_s = _children_cpu_s() - cpu_before
    gains = _feature_gains(control)
    ranked = sorted(gains, key=lambda path: (-gains[path] / (path.stat().st_size + 64), path.stat().st_size))
    crash_inputs = [crashes / name for name in sorted(report.crashes) if (crashes / name).exists()]
    chosen: dict[str, bytes] = {}
    total = kept_gain = 0
    for path in crash_inputs + ranked:
        data = path.read_bytes()
        sha1 = hashlib.sha1(data).hexdigest()
        if sha1 in chosen or total + len(data) > options.max_corpus_bytes:
            continue
        if len(chosen) >= options.max_corpus_files:
            break
        chosen[sha1] = data
        total += len(data)
        kept_gain += gains.get(path, 0)
    for path in options.corpus.iterdir():
        if _HEX_NAME.match(path.name):
            path.unlink()
    for sha1, data in chosen.items():
        (options.corpus / sha1).write_bytes(data)
    report.corpus_files, report.corpus_bytes = len(chosen), total
    report.corpus_features = (kept_gain, sum(gains.values()))
    if kept_gain < sum(gains.values()):
        logger.warning(
            "corpus capped: %d of %d inputs that add coverage kept, with %d of their %d features",
            len(chosen) - len(crash_inputs), len(gains), kept_gain, sum(gains.values()),
        )  # fmt: skip


def format_report(report: FuzzReport) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in report.versions.items())
    seeds = ", ".join(f"{k} {v}" for k, v in sorted(report.seeds.items()))
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(report.outcomes.items(), key=lambda kv: -kv[1]))
    lines = [
        f"tool: {versions}",
        f"seeds: {seeds}",
        f"CPU budget {report.budget_s:.0f} s: {report.cpu_s:.0f} CPU-s fuzzing in {report.workers} worker(s), "
        f"{report.merge_cpu_s:.0f} CPU-s merging, {report.wall_s:.0f} s wall, libFuzzer seed {report.seed}",
        f"executions: {report.executions} ({report.executions / max(report.cpu_s, 1e-9):.0f}/CPU-s); "
        f"slowest input {report.slowest_s:.2f} s",
        f"outcomes: {outcomes}",
        f"crashes: {len(report.crashes)}",
        *(f"  {name}: {signature}" for name, signature in sorted(report.crashes.items())),
        f"corpus: {report.corpus_files} files, {report.corpus_bytes} bytes, adding {report.corpus_features[0]} "
        f"coverage features to the seeds' (of {report.corpus_features[1]} found)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    _worker_main(sys.argv)
