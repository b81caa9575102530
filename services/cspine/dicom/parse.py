"""Reading one Part-10 instance for ingest: the header parsed once (a deflated data set's inflated size
bounded first, a truncated header refused), and the pixel data located in the bytes or file, not read."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import pydicom
import pydicom.uid
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import data_element_generator

from cspine.dicom.attributes import tag_and_vr, tag_name, text
from cspine.dicom.records import Pixels
from cspine.errors import (
    MalformedDicomError,
    NotDicomError,
    StudyTooLargeError,
    TruncatedDicomError,
    UndecodablePixelDataError,
)

_PIXEL_TAGS = {
    tag_for_keyword("PixelData"): "PixelData",
    tag_for_keyword("FloatPixelData"): "FloatPixelData",
    tag_for_keyword("DoubleFloatPixelData"): "DoubleFloatPixelData",
}
_UNDEFINED_LENGTH = 0xFFFFFFFF


def open_source(source: Any) -> Any:
    """A binary stream over the instance: its bytes (no copy) or its file."""
    return open(source, "rb") if isinstance(source, Path) else io.BytesIO(source)


def _source_size(source: Any, stream: Any) -> int:
    return os.fstat(stream.fileno()).st_size if isinstance(source, Path) else len(source)


def parse(label: str, source: Any, max_inflated: int) -> tuple[Dataset, Pixels | None]:
    """Parse the header once, and locate the pixel data without reading it.

    ``source`` is the instance's bytes, or the Path of its file (whose pixel data is then read at decode).
    A deflated data set may inflate to at most ``max_inflated`` bytes.
    """
    with open_source(source) as stream:
        size = _source_size(source, stream)
        _check_inflated_size(label, stream, max_inflated)
        try:
            ds = pydicom.dcmread(stream, stop_before_pixels=True)
        except InvalidDicomError:
            raise NotDicomError(label, "not a DICOM Part-10 file (no 'DICM' prefix after the preamble)") from None
        except (EOFError, struct.error):
            raise TruncatedDicomError(label, "the file ends inside its header") from None
        except OSError as exc:
            # pydicom reports a sequence cut short as an OSError ("No tag to read at file position …").
            raise TruncatedDicomError(label, f"the file ends inside a sequence ({type(exc).__name__})") from None
        except Exception as exc:  # pydicom raises many kinds on garbage; none may leave ingest
            raise NotDicomError(label, f"the header cannot be parsed as DICOM ({type(exc).__name__})") from None
        ds.buffer = None  # the dataset must not keep the upload alive once the pixels are decoded
        _check_header_complete(label, ds, stream, size)
        if text(ds.file_meta, "TransferSyntaxUID") == pydicom.uid.DeflatedExplicitVRLittleEndian:
            return ds, _locate_deflated_pixels(label, source)
        return ds, _locate_pixels(label, source, size, stream, ds)


_DEFLATED_SYNTAX = pydicom.uid.DeflatedExplicitVRLittleEndian.encode("ascii")
_INFLATE_STEP = 16 * 1024 * 1024


def _check_inflated_size(label: str, stream: Any, limit: int) -> None:
    """pydicom inflates a deflated data set in one piece, so a small upload could inflate to gigabytes (a
    zip bomb). Inflate it first in bounded steps, only counting, and refuse it beyond ``limit``.

    Runs before pydicom has read the file meta, so it finds the data set's start from the File Meta
    Information Group Length, which Part 10 requires."""
    head = stream.read(144)
    try:
        if len(head) < 144 or head[128:132] != b"DICM":
            return  # pydicom refuses it
        group, element, vr, _, group_length = struct.unpack("<HH2sHI", head[132:144])
        has_group_length = (group << 16 | element) == tag_and_vr("FileMetaInformationGroupLength")[0] and vr == b"UL"
        meta = stream.read(group_length if has_group_length else 4096)
        if _DEFLATED_SYNTAX not in meta:
            return
        if not has_group_length:
            raise NotDicomError(label, "a deflated file without File Meta Information Group Length")
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        pending, total = stream.read(), 0
        while pending and total <= limit:
            total += len(inflater.decompress(pending, _INFLATE_STEP))
            pending = inflater.unconsumed_tail
        if total > limit:
            raise StudyTooLargeError(f"instance {label}: the deflated data set inflates to more than {limit} bytes")
    except zlib.error:
        pass  # pydicom will fail on it, and say so
    finally:
        stream.seek(0)


def _check_header_complete(label: str, ds: Dataset, stream: Any, size: int) -> None:
    """pydicom stops silently where a file ends: a cut inside the last attribute's value, or a few bytes
    after it that make no attribute header, mean a truncated file."""
    tags = list(ds.keys())  # in the order read from the file
    if not tags:
        raise TruncatedDicomError(label, "the data set is empty or ends inside its first attribute")
    last = ds.get_item(tags[-1], keep_deferred=True)
    if not isinstance(last, RawDataElement) or last.length == _UNDEFINED_LENGTH or last.value is None:
        return
    if len(last.value) < last.length:
        raise TruncatedDicomError(label, f"the file ends inside attribute {tag_name(last.tag)}")
    end = last.value_tell + last.length
    if stream.tell() >= size and 0 < size - end < 8:
        raise TruncatedDicomError(label, f"the file ends inside the attribute after {tag_name(last.tag)}")


def _locate_pixels(label: str, source: Any, size: int, stream: Any, ds: Dataset) -> Pixels | None:
    """Read the pixel data element's header where ``stop_before_pixels`` left the stream."""
    if stream.tell() >= size:
        return None
    implicit_vr, little_endian = ds.original_encoding
    if implicit_vr is None or little_endian is None:  # pydicom sets both, or neither for a dataset it did not read
        return None
    elements = data_element_generator(stream, implicit_vr, little_endian, defer_size=0)
    try:
        elem = next(elements, None)
    except EOFError:
        raise TruncatedDicomError(label, "the file ends inside the encapsulated pixel data") from None
    except Exception as exc:
        raise UndecodablePixelDataError(
            label, f"the pixel data element cannot be read ({type(exc).__name__})"
        ) from None
    if elem is None or elem.tag not in _PIXEL_TAGS:
        return None
    if not isinstance(elem, RawDataElement):  # pydicom parses an undefined-length SQ at once
        raise MalformedDicomError(label, "the pixel data element is a sequence")
    keyword = _PIXEL_TAGS[elem.tag]
    if elem.length == _UNDEFINED_LENGTH:
        # The stream now stands after the sequence delimiter item (8 bytes).
        end = stream.tell() - 8
        return Pixels(source, elem.value_tell, end - elem.value_tell, True, keyword, False)
    if elem.value_tell + elem.length > size:
        have = size - elem.value_tell
        raise TruncatedDicomError(label, f"the pixel data ends after {have} of its {elem.length} bytes")
    return Pixels(source, elem.value_tell, elem.length, False, keyword, False)


def _locate_deflated_pixels(label: str, source: Any) -> Pixels | None:
    """Deflated files are inflated by pydicom; read the whole data set to see the pixel data's length."""
    try:
        with open_source(source) as stream:
            full = pydicom.dcmread(stream)
        keyword = next((k for k in _PIXEL_TAGS.values() if k in full), None)
        if keyword is None:
            return None
        elem = full[keyword]
        length = len(elem.value) if elem.value is not None else 0
    except Exception as exc:
        raise TruncatedDicomError(label, f"the deflated data set cannot be read ({type(exc).__name__})") from None
    return Pixels(source, 0, length, bool(elem.is_undefined_length), keyword, True)
