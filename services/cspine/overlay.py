"""A DICOM SEG drawn for people: the source image holding the most tumor, in grey, with every segment on it as
a translucent colour, written as a PNG. What stops a drawing is an ``OverlayError`` saying why in one line."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from pydicom.errors import InvalidDicomError

from cspine.client.files import iter_files
from cspine.errors import CspineError

logger = logging.getLogger(__name__)

__all__ = ["OverlayError", "busiest_source_frame", "overlay_png"]

BONE_WINDOW = (400.0, 1800.0)  # CT level and width, HU
PERCENTILES = (1.0, 99.0)  # the grey range of MR and radiographs
ALPHA = 0.45
FALLBACK_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75), (23, 190, 207)]

SourceFrame = tuple[str, int]  # (SOPInstanceUID, 1-based frame number)
# What highdicom and pydicom raise on a SEG or an image they cannot read.
READ_ERRORS = (InvalidDicomError, ValueError, TypeError, AttributeError, LookupError, EOFError, OSError)


class OverlayError(CspineError, ValueError):
    """The overlay cannot be drawn: the message says why, in one line."""


def overlay_png(seg_bytes: bytes, source_paths: Iterable[Path | str], out: Path) -> Path:
    """Draw the SEG on the source frame with the most tumor (segments labelled "…tumor…"; without one, the
    most of any segment), read from the DICOM files under ``source_paths``; write the PNG to ``out``.
    ``OverlayError`` when the SEG or its source image cannot be read, or the PNG cannot be written."""
    try:
        seg = hd.seg.segread(seg_bytes)
    except READ_ERRORS as exc:
        raise OverlayError(f"the DICOM SEG cannot be read ({type(exc).__name__})") from exc
    uid, frame = busiest_source_frame(seg)
    header, path = _find_source(source_paths, uid)
    try:
        image = hd.imread(path, lazy_frame_retrieval=True).get_frame(frame, dtype=np.float32)
    except READ_ERRORS as exc:
        raise OverlayError(f"the SEG's source image {path} cannot be read ({type(exc).__name__})") from exc
    items = {int(item.SegmentNumber): item for item in seg.SegmentSequence}
    labels = {n: str(item.SegmentLabel) for n, item in items.items()}
    colours = {n: _colour(item, n) for n, item in items.items()}
    # tumor segments drawn last, on top of the anatomy
    segments = sorted(_frames_by_source(seg)[(uid, frame)], key=lambda s: ("tumor" in labels[s[0]].lower(), s[0]))
    masks = {n: seg.get_stored_frame(i, as_index=True).astype(bool) for n, i in segments}
    return _draw(image, header, frame, masks, labels, colours, out)


def busiest_source_frame(seg: hd.seg.Segmentation) -> SourceFrame:
    """The source frame with the most pixels of the segments labelled "…tumor…" (of any segment when none is)."""
    labels = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence}
    focus = {n for n, label in labels.items() if "tumor" in label.lower()} or set(labels)
    counts: Counter[SourceFrame] = Counter()
    for source, segments in _frames_by_source(seg).items():
        counts[source] = sum(
            int(np.count_nonzero(seg.get_stored_frame(i, as_index=True))) for n, i in segments if n in focus
        )
    if not counts or max(counts.values()) == 0:
        raise OverlayError("the DICOM SEG holds no segmented pixel to draw")
    return counts.most_common(1)[0][0]


def _frames_by_source(seg: hd.seg.Segmentation) -> dict[SourceFrame, list[tuple[int, int]]]:
    """(segment number, SEG frame index) of every SEG frame, by the source frame it lies on."""
    frames: dict[SourceFrame, list[tuple[int, int]]] = {}
    for index, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        key = (str(source.ReferencedSOPInstanceUID), int(source.get("ReferencedFrameNumber", 1)))
        frames.setdefault(key, []).append((number, index))
    return frames


def _find_source(paths: Iterable[Path | str], sop_instance_uid: str) -> tuple[pydicom.Dataset, Path]:
    for path in iter_files(paths):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError):
            continue  # not DICOM (truth.json, labels.npz …) or unreadable: not the source
        if header.get("SOPInstanceUID") == sop_instance_uid:
            return header, path
    raise OverlayError(f"the SEG's source image {sop_instance_uid} is not among the local DICOM files")


def _colour(item: pydicom.Dataset, number: int) -> tuple[float, float, float]:
    if "RecommendedDisplayCIELabValue" in item:
        rgb = hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb()
    else:
        rgb = FALLBACK_COLOURS[(number - 1) % len(FALLBACK_COLOURS)]
    red, green, blue = rgb
    return float(red) / 255, float(green) / 255, float(blue) / 255


def _grey_range(header: pydicom.Dataset, image: np.ndarray) -> tuple[float, float]:
    if header.Modality == "CT":  # HU after the rescale: a bone window shows vertebrae and lytic lesions
        level, width = BONE_WINDOW
        return level - width / 2, level + width / 2
    low, high = np.percentile(image, PERCENTILES)
    return float(low), float(max(high, low + 1e-6))


def _draw(
    image: np.ndarray,
    header: pydicom.Dataset,
    frame: int,
    masks: dict[int, np.ndarray],
    labels: dict[int, str],
    colours: dict[int, tuple[float, float, float]],
    out: Path,
) -> Path:
    spacing = header.get("PixelSpacing") or header.get("ImagerPixelSpacing") or (1.0, 1.0)
    aspect = float(spacing[0]) / float(spacing[1])  # rows apart over columns apart
    rgba = np.zeros((*image.shape, 4), dtype=np.float32)
    for number, mask in masks.items():  # later ones on top
        rgba[mask] = (*colours[number], ALPHA)

    figure = Figure(figsize=(7, 7 * min(max(image.shape[0] * aspect / image.shape[1], 0.5), 2.0)), dpi=100)
    ax = figure.add_subplot()
    low, high = _grey_range(header, image)
    ax.imshow(image, cmap="gray", vmin=low, vmax=high, aspect=aspect, interpolation="nearest")
    ax.imshow(rgba, aspect=aspect, interpolation="nearest")
    ax.set_axis_off()
    shown = [n for n, mask in masks.items() if mask.any()]
    ax.legend(
        handles=[Patch(color=colours[n], label=labels[n]) for n in shown],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),  # beside the image, never over it
        fontsize="small",
    )
    text = f"{header.get('SeriesDescription', '')} {header.get('ImageComments', '')}"
    synthetic = "SYNTHETIC — " if "SYNTHETIC" in text.upper() else ""
    where = (
        f"frame {frame}"
        if int(header.get("NumberOfFrames", 1) or 1) > 1
        else f"image {header.get('InstanceNumber', '')}"
    )
    ax.set_title(f"{synthetic}{header.Modality} {where}", fontsize="medium")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, format="png", bbox_inches="tight")
    except OSError as exc:
        raise OverlayError(f"{out} cannot be written: {exc.strerror or type(exc).__name__}") from exc
    logger.info("overlay of %d segments on %s %s written to %s", len(shown), header.Modality, where, out)
    return out
