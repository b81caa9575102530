"""Seeds for `cspine fuzz ingest --seeds DIR` (make fuzz): the test builders' small files — every encoding
tests/test_ingest_fuzz.py damages — and whole uploads (a CT series, an enhanced MR, a study with an SR, a
DICOMDIR, a colour image), written to a folder. Run as ``python tests/fuzz_seeds.py DIR``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from cspine.dicom.fuzz import pack  # noqa: E402
from support.dicom import (  # noqa: E402
    colour_image,
    ct_series,
    dicomdir_bytes,
    enhanced_series,
    fuzz_seed_files,
    mr_series,
    other_modality_image,
    sr_document,
)


def seed_inputs() -> dict[str, bytes]:
    """Fuzz inputs by name: single instances, and bundles (uploads of several instances)."""
    inputs = {f"builder-{n:02d}.dcm": data for n, (_, data) in enumerate(fuzz_seed_files())}
    ct = ct_series(4, rows=8, cols=8)
    mr = mr_series(3, rows=8, cols=8, study_uid=ct.study_uid)
    inputs["upload-ct-series.bundle"] = pack(data for _, data in ct.files)
    inputs["upload-enhanced.bundle"] = pack(data for _, data in enhanced_series(2, rows=6, cols=6).files)
    inputs["upload-ct-mr-sr.bundle"] = pack(
        [ct.files[0][1], ct.files[1][1], mr.files[0][1], sr_document(study_uid=ct.study_uid)[1]]
    )
    inputs["upload-colour-other.bundle"] = pack(
        [colour_image(study_uid=ct.study_uid).files[0][1], other_modality_image(study_uid=ct.study_uid).files[0][1]]
    )
    inputs["dicomdir.dcm"] = dicomdir_bytes()
    return inputs


def main(folder: str) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in seed_inputs().items():
        (out / name).write_bytes(data)
    print(f"wrote {len(seed_inputs())} seed inputs to {out}")


if __name__ == "__main__":
    main(sys.argv[1])
