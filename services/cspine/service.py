"""The transport-free data plane the gateway serves: one study's DICOM instances in, its analysis out,
within the service's limits. It owns the Triton client, the prototype set and the calibration.

Studies in flight are bounded: a study that finds the service full is refused at once
(``LimitExceededError`` → RESOURCE_EXHAUSTED) rather than queued without bound, and the slot is taken
before the upload is read, so memory is bounded by the studies in flight times their size limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cspine
from cspine.analysis.fusion import Calibration
from cspine.config import IngestLimits
from cspine.dicom.ingest import ingest
from cspine.domain import ModelVersion, StudyAnalysis
from cspine.errors import LimitExceededError
from cspine.fewshot.prototypes import PrototypeSet, SupportSet, default_prototypes
from cspine.inference.client import TritonClient
from cspine.pipeline import AnalysisOptions, analyze, model_versions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceInfo:
    version: str
    models: list[ModelVersion]
    prototype_set_version: str
    labels: tuple[str, ...]
    synthetic_support_set: bool
    limits: IngestLimits
    max_studies_in_flight: int


class AnalysisService:
    def __init__(
        self,
        triton: TritonClient,
        repository: Path,
        *,
        limits: IngestLimits = IngestLimits(),
        max_studies_in_flight: int = 2,
        prototypes: PrototypeSet | None = None,
        synthetic_support_set: bool | None = None,
    ) -> None:
        if max_studies_in_flight < 1:
            raise ValueError(f"max_studies_in_flight must be at least 1, got {max_studies_in_flight}")
        self.triton = triton
        self.limits = limits
        self.max_studies_in_flight = max_studies_in_flight
        self.prototypes = prototypes or default_prototypes()
        self.synthetic_support_set = (
            SupportSet.load().synthetic if synthetic_support_set is None else synthetic_support_set
        )
        self.calibration = Calibration.load(repository)
        self.models = model_versions(repository)
        self.in_flight = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the in-flight places for the duration of a study; refuse when none is free."""
        if self.in_flight >= self.max_studies_in_flight:
            raise LimitExceededError(f"the service is analysing {self.in_flight} studies, its limit; try again shortly")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def analyze(
        self, instances: Sequence[tuple[str, bytes]], options: AnalysisOptions = AnalysisOptions()
    ) -> StudyAnalysis:
        """Ingest the instances (named for error messages) and analyse the study."""
        study = await asyncio.to_thread(ingest, instances, self.limits)
        return await analyze(study, self.triton, self.prototypes, self.calibration, options, self.models)

    async def ready(self) -> bool:
        """Whether Triton answers and serves every model the pipeline calls."""
        try:
            await self.triton.check_ready(timeout_s=2.0)
        except Exception:  # noqa: BLE001 - any failure to answer means not ready; the reason is logged
            logger.warning("Triton at %s is not ready", self.triton.url)
            return False
        return True

    def info(self) -> ServiceInfo:
        return ServiceInfo(
            version=cspine.__version__,
            models=self.models,
            prototype_set_version=self.prototypes.version,
            labels=self.prototypes.labels,
            synthetic_support_set=self.synthetic_support_set,
            limits=self.limits,
            max_studies_in_flight=self.max_studies_in_flight,
        )
