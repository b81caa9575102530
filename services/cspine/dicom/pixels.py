"""Pixel data for ingest: the Image Pixel module read and sized, frames decoded (native data in place, else
by one pydicom plugin after each codestream's header is checked against the DICOM header) and converted to
float32 modality units (rescale or Modality LUT, MONOCHROME1 inverted) into the series' volume."""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
import pydicom.uid
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragmented_frames
from pydicom.pixels import apply_modality_lut
from pydicom.pixels import pixel_array as pydicom_pixel_array

from cspine.dicom.attributes import has, int_value, safe, text
from cspine.dicom.parse import open_source
from cspine.dicom.records import Frame, Image, Instance
from cspine.errors import (
    CspineError,
    MalformedDicomError,
    TruncatedDicomError,
    UndecodablePixelDataError,
)

logger = logging.getLogger(__name__)

_DECODE_THREADS = min(4, os.cpu_count() or 1)  # threads converting native pixel data (see decode_all)

# Decoder plugins ingest lets pydicom use, best first. GDCM is left out on purpose: on some malformed input
# it throws a C++ exception that nothing catches, and the process aborts (found by fuzzing).
_DECODING_PLUGIN_PREFERENCE = ("pylibjpeg", "pyjpegls", "pydicom", "pillow")

# Stored pixel dtypes of native pixel data read in place: (BitsAllocated, PixelRepresentation) → dtype.
_NATIVE_DTYPE = {
    (8, 0): np.uint8,
    (8, 1): np.int8,
    (16, 0): np.uint16,
    (16, 1): np.int16,
    (32, 0): np.uint32,
    (32, 1): np.int32,
}


def read_image(label: str, ds: Dataset) -> Image:
    """The Image Pixel module, validated."""
    rows, columns = int_value(ds, "Rows"), int_value(ds, "Columns")
    bits_allocated = int_value(ds, "BitsAllocated")
    if not rows or not columns or rows <= 0 or columns <= 0:
        raise MalformedDicomError(label, "Rows or Columns is missing or not positive")
    if bits_allocated is None or not (bits_allocated == 1 or (bits_allocated % 8 == 0 and 8 <= bits_allocated <= 64)):
        raise MalformedDicomError(label, f"BitsAllocated {bits_allocated} is not usable")
    samples = int_value(ds, "SamplesPerPixel") or 1
    bits_stored = int_value(ds, "BitsStored") or bits_allocated
    frame_count = int_value(ds, "NumberOfFrames") or 1
    if samples <= 0 or frame_count <= 0 or not 0 < bits_stored <= bits_allocated:
        raise MalformedDicomError(label, "SamplesPerPixel, NumberOfFrames or BitsStored is not usable")
    photometric = (text(ds, "PhotometricInterpretation") or ("MONOCHROME2" if samples == 1 else "RGB")).upper()
    return Image(
        rows=rows,
        columns=columns,
        samples=samples,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        signed=int_value(ds, "PixelRepresentation") == 1,
        photometric=photometric,
        frame_count=frame_count,
        modality_lut=has(ds, "ModalityLUTSequence"),
    )


def bytes_per_frame(image: Image) -> int:
    return image.rows * image.columns * image.samples * math.ceil(image.bits_allocated / 8)


def native_bytes_needed(image: Image) -> int:
    if image.bits_allocated == 1:
        return math.ceil(image.rows * image.columns * image.samples * image.frame_count / 8)
    return bytes_per_frame(image) * image.frame_count


def _is_native(inst: Instance) -> bool:
    """Native pixel data numpy reads as it lies (no decoder, no bit unpacking, no byte swapping of 8-bit OW)."""
    image, pixels = inst.image, inst.pixels
    return (
        image is not None
        and pixels is not None
        and not pixels.encapsulated
        and not pixels.deflated
        and pixels.keyword == "PixelData"
        and (image.bits_allocated, int(image.signed)) in _NATIVE_DTYPE
        and image.samples == 1
        and (inst.ds.original_encoding[1] or image.bits_allocated > 8)
    )


def decode(inst: Instance) -> np.ndarray:
    """The stored values of every frame, shape (frames, rows, columns); read in place when native."""
    image, pixels = inst.image, inst.pixels
    assert image is not None and pixels is not None
    dtype = _NATIVE_DTYPE.get((image.bits_allocated, int(image.signed)))
    fast = _is_native(inst)
    if fast:
        byte_order: Literal["<", ">"] = "<" if inst.ds.original_encoding[1] else ">"
        count = image.rows * image.columns * image.frame_count
        buffer, offset = _native_bytes(inst, count * np.dtype(dtype).itemsize)
        stored = np.frombuffer(buffer, np.dtype(dtype).newbyteorder(byte_order), count, offset)
        stored = _mask_unused_bits(stored, image)
        return stored.reshape(image.frame_count, image.rows, image.columns)
    return _decode_with_pydicom(inst)


def _native_bytes(inst: Instance, length: int) -> tuple[Any, int]:
    """(buffer, offset) of native pixel data: the uploaded bytes in place, or read from the file now."""
    pixels = inst.pixels
    assert pixels is not None
    if not isinstance(pixels.source, Path):
        return pixels.source, pixels.offset
    buffer = np.empty(length, dtype=np.uint8)
    try:
        with open(pixels.source, "rb") as stream:
            stream.seek(pixels.offset)
            read = stream.readinto(buffer.data)
    except OSError as exc:
        raise TruncatedDicomError(inst.label, f"the file cannot be read again ({exc.strerror})") from None
    if read != length:
        raise TruncatedDicomError(inst.label, f"the file lost its pixel data after {read} of {length} bytes")
    return buffer, 0


def _mask_unused_bits(stored: np.ndarray, image: Image) -> np.ndarray:
    """Ignore bits above BitsStored (PS3.5 8.1.1): mask them, or sign-extend signed values."""
    shift = image.bits_allocated - image.bits_stored
    if shift == 0 or stored.size == 0:
        return stored
    if image.signed:
        low, high = -(1 << (image.bits_stored - 1)), (1 << (image.bits_stored - 1)) - 1
        if stored.min() >= low and stored.max() <= high:
            return stored
        return (stored.astype(stored.dtype.newbyteorder("=")) << shift) >> shift
    mask = (1 << image.bits_stored) - 1
    if stored.max() <= mask:
        return stored
    return stored & stored.dtype.type(mask)


def _decode_with_pydicom(inst: Instance) -> np.ndarray:
    """Compressed, deflated, bit-packed or float pixel data: let pydicom and its plugins decode it."""
    image, pixels = inst.image, inst.pixels
    assert image is not None and pixels is not None
    transfer_syntax = safe(lambda: text(inst.ds.file_meta, "TransferSyntaxUID"))
    syntax_name = pydicom.uid.UID(transfer_syntax).name if transfer_syntax else "unknown transfer syntax"
    try:
        with open_source(pixels.source) as stream:
            full = pydicom.dcmread(stream)
        plugin = _decoding_plugin(transfer_syntax)
    except Exception as exc:
        raise UndecodablePixelDataError(
            inst.label, f"the {syntax_name} pixel data cannot be read ({type(exc).__name__})"
        ) from None
    if plugin is None:
        raise UndecodablePixelDataError(inst.label, f"no decoder for {syntax_name} is installed")
    _check_codestreams(inst, full, syntax_name)
    try:
        arr = pydicom_pixel_array(full, decoding_plugin=plugin)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # a Rust decoder's panic is a BaseException (pyo3 PanicException)
        logger.debug(
            "%s pixel data of %s not decoded by %s: %s: %s",
            syntax_name,
            inst.label,
            plugin or "pydicom",
            type(exc).__name__,
            exc,
        )
        raise UndecodablePixelDataError(
            inst.label, f"the {syntax_name} pixel data cannot be decoded ({type(exc).__name__})"
        ) from None
    expected = image.frame_count * image.rows * image.columns
    if arr.size != expected:
        raise UndecodablePixelDataError(
            inst.label, f"the {syntax_name} pixel data decodes to {arr.size} values, not {expected}"
        )
    return arr.reshape(image.frame_count, image.rows, image.columns)


# Markers that start a JPEG frame header (SOF0…SOF15 but DHT/JPG/DAC) and JPEG-LS's SOF55.
_JPEG_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RST0…7, SOI: no length field
_J2K_CODESTREAM = b"\xff\x4f\xff\x51"  # SOC then SIZ


def _jpeg_frame_size(fragment: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG or JPEG-LS frame header, walking the marker segments."""
    if fragment[:2] != b"\xff\xd8":
        return None
    position = 2
    while position + 4 <= len(fragment):
        if fragment[position] != 0xFF:
            return None
        marker = fragment[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _JPEG_STANDALONE_MARKERS:
            position += 2
            continue
        if marker in _JPEG_SOF_MARKERS and position + 10 <= len(fragment):
            rows, columns = struct.unpack(">HH", fragment[position + 5 : position + 9])
            return rows, columns, fragment[position + 9]
        if marker in (0xDA, 0xD9):  # a scan or the end before any frame header
            return None
        position += 2 + int.from_bytes(fragment[position + 2 : position + 4], "big")
    return None


def _j2k_frame_size(fragment: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG 2000 SIZ segment (a raw codestream, or one inside JP2 boxes)."""
    start = fragment.find(_J2K_CODESTREAM, 0, 4096)
    if start < 0 or start + 42 > len(fragment):
        return None
    x_size, y_size, x_offset, y_offset = struct.unpack(">IIII", fragment[start + 8 : start + 24])
    components = int.from_bytes(fragment[start + 40 : start + 42], "big")
    return y_size - y_offset, x_size - x_offset, components


# Which header reader checks which transfer syntax's frames.
_FRAME_SIZE_READERS: dict[str, Callable[[bytes], tuple[int, int, int] | None]] = {
    **{syntax: _jpeg_frame_size for syntax in pydicom.uid.JPEGTransferSyntaxes},
    **{syntax: _jpeg_frame_size for syntax in pydicom.uid.JPEGLSTransferSyntaxes},
    **{syntax: _j2k_frame_size for syntax in pydicom.uid.JPEG2000TransferSyntaxes},
}


def _check_codestreams(inst: Instance, full: Dataset, syntax_name: str) -> None:
    """Compare each frame's codestream header with Rows × Columns before any decoder sees it.

    The decoders size their buffers from the codestream, not from the DICOM header; a damaged header can make
    one allocate gigabytes or abort the process (std::bad_alloc escaping C++), so such frames never reach one.
    """
    image = inst.image
    assert image is not None
    transfer_syntax = safe(lambda: text(inst.ds.file_meta, "TransferSyntaxUID"))
    reader = _FRAME_SIZE_READERS.get(transfer_syntax or "")
    if reader is None:
        return
    try:
        frames = generate_fragmented_frames(full.PixelData, number_of_frames=image.frame_count)
        for number, fragments in enumerate(itertools.islice(frames, image.frame_count), start=1):
            size = reader(fragments[0]) if fragments else None
            if size is None:
                raise UndecodablePixelDataError(inst.label, f"frame {number} has no {syntax_name} header")
            rows, columns, components = size
            if (rows, columns) != (image.rows, image.columns) or components != image.samples:
                raise UndecodablePixelDataError(
                    inst.label,
                    f"frame {number}'s {syntax_name} header says {rows}×{columns}×{components}, "
                    f"the DICOM header {image.rows}×{image.columns}×{image.samples}",
                )
    except CspineError:
        raise
    except Exception as exc:
        raise UndecodablePixelDataError(
            inst.label, f"the {syntax_name} pixel data items cannot be read ({type(exc).__name__})"
        ) from None


def can_decode(transfer_syntax: str) -> bool:
    """Whether ingest decodes pixel data in this transfer syntax here (the DICOM node offers these)."""
    try:
        return _decoding_plugin(transfer_syntax) is not None
    except (NotImplementedError, ValueError):  # no decoder at all for it (a video or an unknown syntax)
        return False


def _decoding_plugin(transfer_syntax: str | None) -> str | None:
    """The one pydicom decoding plugin used for a transfer syntax ("" is pydicom's own native decoder), or
    None when none is installed. One, not a chain: a stream one decoder refuses is damaged, and handing
    it to the next only costs time (CharLS needs seconds to refuse some damaged JPEG-LS streams)."""
    decoder = pydicom.pixels.get_decoder(pydicom.uid.UID(transfer_syntax or ""))
    if decoder.is_native:
        return ""
    available = set(decoder.available_plugins)
    return next((plugin for plugin in _DECODING_PLUGIN_PREFERENCE if plugin in available), None)


@dataclass(frozen=True)
class _Transform:
    """Stored values → modality units (→ inverted for MONOCHROME1), for one frame."""

    slope: float
    intercept: float
    lut: Dataset | None  # the dataset holding a Modality LUT Sequence, applied instead of the rescale
    invert_sum: float | None  # lo + hi of the output range for MONOCHROME1

    def apply(self, stored: np.ndarray, out: np.ndarray) -> None:
        if self.lut is not None:
            out[...] = apply_modality_lut(stored, self.lut)
        elif self.slope == 1.0:
            np.add(stored, np.float32(self.intercept), out=out, casting="unsafe")
        else:
            np.multiply(stored, self.slope, out=out, casting="unsafe")
            if self.intercept:
                out += np.float32(self.intercept)
        if self.invert_sum is not None:
            np.subtract(np.float32(self.invert_sum), out, out=out)


def _stored_range(image: Image) -> tuple[int, int]:
    if image.signed:
        return -(1 << (image.bits_stored - 1)), (1 << (image.bits_stored - 1)) - 1
    return 0, (1 << image.bits_stored) - 1


def transform(inst: Instance, frame: Frame) -> _Transform:
    image = inst.image
    assert image is not None
    lut = inst.ds if image.modality_lut else None
    invert_sum = None
    if image.photometric == "MONOCHROME1":
        low, high = _stored_range(image)
        if lut is not None:
            mapped = apply_modality_lut(np.arange(low, high + 1), lut)
            invert_sum = float(np.min(mapped) + np.max(mapped))
        else:
            ends = (low * frame.slope + frame.intercept, high * frame.slope + frame.intercept)
            invert_sum = float(min(ends) + max(ends))
    return _Transform(frame.slope, frame.intercept, lut, invert_sum)


def _decode_into(inst: Instance, targets: list[tuple[int, Frame]], voxels: np.ndarray) -> None:
    stored = decode(inst)
    for k, frame in targets:
        transform(inst, frame).apply(stored[frame.index], voxels[k])
    inst.pixels = None  # the raw bytes may go now


def decode_all(work: list[tuple[Instance, list[tuple[int, Frame]]]], voxels: np.ndarray) -> None:
    """Decode every instance into its slices of ``voxels``.

    Native pixel data is read and converted by a few threads: file reads and numpy release the GIL, and each
    instance writes only its own slices (on the 2-core reference machine this lifts ingest from ~0.8× to
    ~0.87× bare pydicom's slices/s). Compressed data is decoded in this thread, because not every decoder
    plugin is known to be thread-safe. Results are awaited in slice order, so the first failure in slice
    order is the one raised.
    """
    native = [(inst, targets) for inst, targets in work if _is_native(inst)]
    other = [(inst, targets) for inst, targets in work if not _is_native(inst)]
    workers = min(_DECODE_THREADS, len(native))
    if workers > 1:
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="cspine-decode") as pool:
            futures = [pool.submit(_decode_into, inst, targets, voxels) for inst, targets in native]
            for future in futures:
                future.result()
    else:
        other = work
    for inst, targets in other:
        _decode_into(inst, targets, voxels)
