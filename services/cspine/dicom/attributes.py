"""Header attributes read by keyword as typed values (text, integers, finite numbers, sequence items), fast
from pydicom's raw elements; the readers every ingest module uses."""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from cspine.errors import MalformedDicomError

# pydicom converts a raw element on first access through several layers (~10 µs each); a 512² slice leaves
# ingest about 0.6 ms in all if it is to keep pace with bare pydicom, so the ~20 attributes read from every
# instance are decoded here straight from pydicom's raw element. Anything unusual (an unexpected VR, a value
# that does not parse) falls back to pydicom's own conversion, so the fast path never changes a result.


def _decode_us(value: bytes, little_endian: bool) -> tuple[int, ...]:
    count = len(value) // 2
    if count * 2 != len(value):
        raise ValueError("odd length")
    return struct.unpack(("<" if little_endian else ">") + "H" * count, value)


def _split_text(value: bytes) -> list[str]:
    return [part.strip(" \x00") for part in value.decode("ascii").split("\\")]


def _decode_is(value: bytes, little_endian: bool) -> tuple[int, ...]:
    return tuple(int(part) for part in _split_text(value) if part)


def _decode_ds(value: bytes, little_endian: bool) -> tuple[float, ...]:
    numbers = tuple(float(part) for part in _split_text(value) if part)
    if not all(math.isfinite(n) for n in numbers):
        raise ValueError("not finite")
    return numbers


def _decode_text(value: bytes, little_endian: bool) -> tuple[str, ...]:
    return tuple(part for part in _split_text(value) if part)


_RAW_DECODERS: dict[str, Callable[[bytes, bool], tuple[Any, ...]]] = {
    "US": _decode_us,
    "IS": _decode_is,
    "DS": _decode_ds,
    "UI": _decode_text,
    "CS": _decode_text,
}


@functools.cache
def tag_and_vr(keyword: str) -> tuple[BaseTag, str]:
    """(tag, dictionary VR) of a keyword; looking a keyword up costs microseconds, so it is done once."""
    number = tag_for_keyword(keyword)
    if number is None:
        raise KeyError(f"{keyword} is not a DICOM keyword")
    tag = BaseTag(number)
    return tag, dictionary_VR(tag)


def has(ds: Dataset | None, keyword: str) -> bool:
    return ds is not None and tag_and_vr(keyword)[0] in ds


def attribute_values(ds: Dataset, keyword: str) -> tuple[Any, ...] | None:
    """The values of an attribute of ``ds`` as a tuple; None when absent or empty."""
    tag, vr = tag_and_vr(keyword)
    elem = ds.get_item(tag)
    if elem is None:
        return None
    if isinstance(elem, RawDataElement) and elem.value is not None:
        decoder = _RAW_DECODERS.get(vr)
        if decoder is not None and elem.VR in (None, vr):
            try:
                values = decoder(elem.value, elem.is_little_endian)
            except (ValueError, UnicodeDecodeError, struct.error):
                pass
            else:
                return values or None
    value = ds[tag].value
    if value is None or value == "" or value == b"":
        return None
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return tuple(value) or None
    return (value,)


def text(ds: Dataset, keyword: str) -> str | None:
    values = attribute_values(ds, keyword)
    return str(values[0]).strip() or None if values else None


def int_value(ds: Dataset, keyword: str) -> int | None:
    values = attribute_values(ds, keyword)
    if not values:
        return None
    number = float(values[0])
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"{keyword} is not an integer")
    return int(number)


def float_value(ds: Dataset | None, keyword: str) -> float | None:
    if ds is None:
        return None
    values = attribute_values(ds, keyword)
    if not values:
        return None
    number = float(values[0])
    return number if math.isfinite(number) else None


def floats(ds: Dataset | None, keyword: str, count: int) -> tuple[float, ...] | None:
    """``count`` finite numbers, or None when the attribute is absent or has another shape."""
    if ds is None:
        return None
    values = attribute_values(ds, keyword)
    if not values or len(values) != count:
        return None
    numbers = tuple(float(v) for v in values)
    return numbers if all(math.isfinite(n) for n in numbers) else None


def first_item(ds: Dataset | None, keyword: str) -> Dataset | None:
    """The first item of a sequence attribute, or None."""
    if ds is None or not has(ds, keyword):
        return None
    sequence = ds[keyword].value
    return sequence[0] if sequence else None


def tag_name(tag: int) -> str:
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def required_text(label: str, ds: Dataset, keyword: str) -> str:
    value = text(ds, keyword)
    if not value:
        raise MalformedDicomError(label, f"{keyword} is missing")
    return value


def safe(read: Callable[[], Any]) -> Any:
    """An optional attribute: None when absent or unreadable."""
    try:
        return read()
    except Exception:
        return None
