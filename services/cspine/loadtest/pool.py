"""The study pool of the load tests: SYNTHETIC phantom studies of realistic sizes and mixed modalities,
generated once into a cached folder with a ``pool.json`` manifest, and read back (every byte once) as the
ready-made AnalyzeStudy request messages a Locust worker sends over and over."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MANIFEST = "pool.json"
POOL_FORMAT = 1  # bump when what a pool holds changes, so cached pools are made again


@dataclass(frozen=True)
class Profile:
    """One kind of study in the pool: the modalities sent, how often it is drawn, its CT slice thickness."""

    name: str
    modalities: tuple[str, ...]
    weight: int = 1
    ct_thickness_mm: float | None = None  # None: the phantom's usual thickness (~84 slices over C1–T1)

    def __post_init__(self) -> None:
        if self.weight < 1:
            raise ValueError(f"profile {self.name}: weight must be at least 1, got {self.weight}")
        if not set(self.modalities) <= {"ct", "mr", "xr"} or not self.modalities:
            raise ValueError(f"profile {self.name}: modalities must be a subset of ct, mr, xr: {self.modalities}")


# realistic: what hospitals send (a full CT + MR + X-ray work-up twice as often as a CT or an MR + X-ray alone);
# small: thick-slice CT and a radiograph, for tests and quick checks of the plumbing.
PRESETS: dict[str, tuple[Profile, ...]] = {
    "realistic": (
        Profile("ct_mr_xr", ("ct", "mr", "xr"), weight=2),
        Profile("ct", ("ct",)),
        Profile("mr_xr", ("mr", "xr")),
    ),
    "small": (
        Profile("ct_thick", ("ct",), ct_thickness_mm=6.0),
        Profile("xr", ("xr",)),
    ),
}
DEFAULT_SIZE = {"realistic": 8, "small": 2}


def plan(preset: str, size: int) -> list[Profile]:
    """The profiles of a pool of ``size`` studies: each profile ``weight`` times in turn, cycled."""
    if preset not in PRESETS:
        raise ValueError(f"unknown pool preset {preset!r}; choose from {', '.join(PRESETS)}")
    if size < 1:
        raise ValueError(f"a pool needs at least 1 study, got {size}")
    cycle = [p for p in PRESETS[preset] for _ in range(p.weight)]
    return [cycle[i % len(cycle)] for i in range(size)]


def pool_dir(cache: Path, preset: str, size: int, seed: int) -> Path:
    return Path(cache) / f"pool-{preset}-{size}-seed{seed}"


def _make_study(args: tuple[Path, str, int, int, Profile]) -> dict:
    from cspine.phantom.generate import PhantomOptions, generate_case
    from cspine.phantom.scanner import Shift

    folder, name, seed, index, profile = args
    options = PhantomOptions(modalities=profile.modalities, shift=Shift(thickness=profile.ct_thickness_mm))
    generate_case(folder / name, name, seed, index, options)
    files = sorted(p for p in (folder / name).rglob("*.dcm"))
    return {
        "name": name,
        "profile": profile.name,
        "modalities": list(profile.modalities),
        "instances": len(files),
        "bytes": sum(p.stat().st_size for p in files),
    }


def ensure_pool(
    cache: Path, preset: str = "realistic", size: int | None = None, seed: int = 0, workers: int = 2
) -> Path:
    """The folder of the pool (preset, size, seed), generated unless a complete one is cached there."""
    size = size or DEFAULT_SIZE[preset]
    profiles = plan(preset, size)
    folder = pool_dir(cache, preset, size, seed)
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text()).get("format") == POOL_FORMAT:
                return folder
        except json.JSONDecodeError:
            pass
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder, f"s{i:02d}-{p.name}", seed, i, p) for i, p in enumerate(profiles)]
    logger.info("generating a %s pool of %d SYNTHETIC studies in %s", preset, size, folder)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as executor:
            studies = list(executor.map(_make_study, jobs))
    else:
        studies = [_make_study(job) for job in jobs]
    body = {
        "format": POOL_FORMAT,
        "synthetic": True,
        "preset": preset,
        "seed": seed,
        "profiles": [asdict(p) for p in PRESETS[preset]],
        "studies": studies,
    }
    manifest.write_text(json.dumps(body, indent=2) + "\n")  # last: a pool without it is made again
    return folder


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no study pool at {folder} (no {MANIFEST}): make one with `cspine loadtest --make-pool`"
        )
    return json.loads(path.read_text())


@dataclass(frozen=True)
class PoolStudy:
    """One study of the pool as the request stream of AnalyzeStudy, ready to send."""

    name: str
    profile: str
    messages: tuple  # cspine.v1.analysis_pb2.StudyUpload, options first
    bytes: int


def load_studies(folder: Path, return_dicom: bool = False) -> list[PoolStudy]:
    """Every study of the pool at ``folder``, read from disk once, as AnalyzeStudy messages (options first;
    DICOM SEG and SR asked for when ``return_dicom``)."""
    from cspine.client import upload_messages
    from cspine.v1 import analysis_pb2 as pb

    options = pb.AnalysisOptions(return_dicom_seg=return_dicom, return_dicom_sr=return_dicom)
    studies = []
    for entry in read_manifest(folder)["studies"]:
        files = sorted((Path(folder) / entry["name"]).rglob("*.dcm"))  # not truth.json and the label maps
        messages = tuple(upload_messages(files, options))
        studies.append(PoolStudy(entry["name"], entry["profile"], messages, sum(m.ByteSize() for m in messages)))
    return studies
