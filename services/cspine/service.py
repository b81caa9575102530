"""The transport-free data plane the gateway serves: one study's DICOM instances in, its analysis out,
within the service's limits. It owns the Triton client, the prototype set and the calibration.

Studies in flight are bounded, and so is the queue before them: a study that finds every slot taken waits in
a FIFO of at most ``max_queued_studies`` (absorbing bursts of arrivals below saturation), and one that finds
the queue full too is refused at once (``ServiceFullError`` → RESOURCE_EXHAUSTED) rather than queued without
bound. The slot is taken before the upload is read (a queued study's upload waits unread in its stream), so
memory is bounded by the studies in flight times their size limits: ingest holds a study within its instance,
byte and voxel limits, and the pipeline refuses one whose model grids would exceed ``max_study_model_bytes``
before allocating them (docs/api.md, "Limits", gives the bound per study).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import cspine
from cspine.analysis.competence import CompetenceReference
from cspine.analysis.fusion import Calibration, matched_lesions
from cspine.config import AnalysisConfig, IngestLimits
from cspine.dicom.ingest import ingest
from cspine.domain import Disclosure, Modality, ModelVersion, StudyAnalysis
from cspine.errors import CspineError, InvalidInputError, ServiceFullError
from cspine.fewshot.prototypes import (
    Adaptation,
    PrototypeSet,
    default_prototypes,
    default_support,
    embedding_key,
)
from cspine.fewshot.store import SITE_SEED_CURATOR, Case, SupportStore, VersionInfo
from cspine.inference.client import TritonClient
from cspine.inference.model_config import model_versions, served_set
from cspine.inference.specs import ENSEMBLES, MODELS
from cspine.pipeline import AnalysisOptions, analyze

logger = logging.getLogger(__name__)

VERSION_RETRY_S = 60.0  # a version set Triton did not load is tried again after this long (each try reloads models)


@dataclass(frozen=True)
class ServiceInfo:
    version: str
    models: list[ModelVersion]
    prototype_set_version: str
    labels: tuple[str, ...]
    synthetic_support_set: bool
    limits: IngestLimits
    max_studies_in_flight: int
    max_queued_studies: int
    disclosure: Disclosure


@dataclass(frozen=True)
class Readiness:
    triton: bool  # Triton answers and every model the pipeline calls is ready
    store: bool  # the support store answers (True for a service without one)

    def __bool__(self) -> bool:
        return self.triton and self.store


def _all_synthetic(cases: list[Case], repository: Path) -> bool:
    """Whether the support set in use is SYNTHETIC: it has cases of the served embedding, every one seeded from the
    served version's default set (the shipped default cases, or a version's own cases from its cohort), and that
    set is SYNTHETIC. A site's own case, or an emptied set, ends it."""
    used = [c for c in cases if c.in_use]
    seeded = all(c.synthetic or c.curator == SITE_SEED_CURATOR for c in used)
    return bool(used) and seeded and default_support(repository).synthetic


def _served_set(repository: Path) -> int | None:
    """The version set the repository's configs serve; None while they name different versions (being
    rewritten by ``cspine models use``, or edited by hand: ``served_set`` says which)."""
    try:
        return served_set(repository)
    except CspineError:
        return None


class AnalysisService:
    def __init__(
        self,
        triton: TritonClient,
        repository: Path,
        config: AnalysisConfig = AnalysisConfig(),
        *,
        prototypes: PrototypeSet | None = None,
        synthetic_support_set: bool | None = None,
        store: SupportStore | None = None,
    ) -> None:
        self.triton = triton
        self.limits = config.limits
        self.max_studies_in_flight = config.max_studies_in_flight
        self.max_queued_studies = config.max_queued_studies
        self.queued = 0
        self._slot_freed = asyncio.Condition()
        # With a store, the prototype set is the store's current version (see refresh_prototypes); without
        # one, the shipped SYNTHETIC default, fixed.
        if store is not None and prototypes is not None:
            raise ValueError("a service with a support store serves the store's prototype sets: give one or the other")
        self.store = store
        self.prototypes = prototypes or (store.prototype_set() if store is not None else default_prototypes(repository))
        self.version_number = store.current_version() if store is not None else 0
        if synthetic_support_set is None:
            synthetic_support_set = (
                _all_synthetic(store.list_cases(), repository)
                if store is not None
                else default_support(repository).synthetic
            )
        self.synthetic_support_set = synthetic_support_set
        self.repository = repository
        self.calibration = Calibration.load(repository)
        self.competence = CompetenceReference.load(repository)
        self.models = model_versions(repository)
        self.version_set = _served_set(repository)
        triton.version_set = self.version_set  # what a pinned client asks Triton for
        self._version_problem = ""  # the last reason a version set could not be switched to, logged once
        self._refused: tuple[int | None, float] = (None, 0.0)  # the last set Triton did not load, and when
        # Held while the version set switches and while AddCase embeds a case and stores it, so that a case is
        # recorded as made by the embedding that made it.
        self._switching = asyncio.Lock()
        self.in_flight = 0
        self.on_prototypes: Callable[[str], None] | None = None  # told the version whenever it changes

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the in-flight places for the duration of a study: at once when one is free and nobody
        waits, else after the studies queued before it; refuse when the queue is full too."""
        if self.in_flight >= self.max_studies_in_flight or self.queued:
            if self.queued >= self.max_queued_studies:
                raise ServiceFullError(
                    f"the service is analysing {self.in_flight} studies, its limit, and {self.queued} wait; "
                    "try again shortly"
                )
            self.queued += 1
            try:
                async with self._slot_freed:
                    await self._slot_freed.wait_for(lambda: self.in_flight < self.max_studies_in_flight)
                    self.in_flight += 1
            finally:
                self.queued -= 1
        else:
            self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            async with self._slot_freed:
                self._slot_freed.notify_all()  # every waiter re-checks; a cancelled one cannot swallow it

    async def analyze(
        self, instances: Sequence[tuple[str, bytes]], options: AnalysisOptions = AnalysisOptions()
    ) -> StudyAnalysis:
        """Ingest the instances (named for error messages) and analyse the study."""
        study = await asyncio.to_thread(ingest, instances, self.limits)
        return await analyze(
            study,
            self.triton,
            self.prototypes,
            self.calibration,
            options,
            self.models,
            self.competence,
            limits=self.limits,
        )

    # -- the support set --------------------------------------------------------------------------------

    def _store(self) -> SupportStore:
        if self.store is None:
            raise InvalidInputError("this service has no support store: it runs the fixed default prototype set")
        return self.store

    async def refresh_prototypes(self) -> bool:
        """Load the store's current prototype set if it changed (another replica may have written); True then."""
        store = self._store()
        number = await asyncio.to_thread(store.current_version)
        if number == self.version_number:
            return False
        prototypes = await asyncio.to_thread(store.prototype_set, number)
        self.prototypes, self.version_number = prototypes, number
        self.synthetic_support_set = _all_synthetic(await asyncio.to_thread(store.list_cases, number), self.repository)
        logger.info("prototype set %s is now in use", prototypes.version)
        if self.on_prototypes is not None:
            self.on_prototypes(prototypes.version)
        return True

    async def watch_store(self, interval_s: float) -> None:
        """Poll the store so changes made through other replicas are used within ``interval_s``."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.refresh_prototypes()
            except CspineError as error:
                logger.warning("support store: %s", error)

    # -- the model version set ----------------------------------------------------------------------------

    def _version_warning(self, message: str) -> None:
        if message != self._version_problem:
            logger.warning("%s", message)
            self._version_problem = message

    async def refresh_models(self) -> bool:
        """Serve the version set the repository's configs name (``cspine models use N``) when it changed: Triton
        loads every model again from its config (a loaded model is replaced without losing its availability),
        and once each model has version N ready, N's calibration, competence reference and reported versions
        are used (and the support set's prototypes refitted with N's calibration). True then. A Triton that
        refuses (started without model control) keeps the set it serves, and so does the service."""
        try:
            number = await asyncio.to_thread(served_set, self.repository)
        except CspineError as error:
            self._version_warning(f"{error}; still serving version set {self.version_set}")
            return False
        if number == self.version_set:
            return False
        refused, when = self._refused
        if number == refused and time.monotonic() - when < VERSION_RETRY_S:
            return False
        async with self._switching:  # no AddCase embeds a case meanwhile (add_case)
            return await self._switch(number)

    async def _switch(self, number: int) -> bool:
        # While its Triton reloads, a pinned client asks for the version Triton has (the old one is unloaded
        # midway); from the switch on, for N, or for the old set again when the switch fails.
        self.triton.version_set = None
        try:
            switched = await self._reload(number)
        finally:
            self.triton.version_set = self.version_set
        return switched

    async def _reload(self, number: int) -> bool:
        try:
            await self.triton.reload((*MODELS, *ENSEMBLES), back_to=self.version_set)
        except CspineError as error:
            self._refused = (number, time.monotonic())
            self._version_warning(
                f"model version set {number} is named in the repository but was not loaded ({error}); "
                f"still serving version set {self.version_set}, trying again in {VERSION_RETRY_S:.0f} s"
            )
            return False
        behind = await self.triton.wait_versions(tuple(MODELS), number)
        if behind:
            self._version_warning(
                f"Triton reloaded the models but does not serve version {number} alone of {', '.join(behind)}; "
                f"still reporting version set {self.version_set}"
            )
            return False

        def version_files():
            store, store_version, synthetic = self.store, 0, False
            if store is None:
                prototypes = default_prototypes(self.repository)
                synthetic = default_support(self.repository).synthetic
            else:  # N's embedding, its default cases (added once), N's calibration for the fitted prototypes
                store.embedding = embedding_key(self.repository)
                store.seed_defaults(default_support(self.repository))
                if store.adaptation is not None:
                    store.adaptation = Adaptation.of_repository(store.adaptation.method, self.repository)
                store_version = store.current_version()
                prototypes = store.prototype_set(store_version)
                synthetic = _all_synthetic(store.list_cases(store_version), self.repository)
            return (
                Calibration.load(self.repository),
                CompetenceReference.load(self.repository),
                model_versions(self.repository),
                prototypes,
                store_version,
                synthetic,
            )

        calibration, competence, models, prototypes, store_version, synthetic = await asyncio.to_thread(version_files)
        self.calibration, self.competence, self.models = calibration, competence, models
        changed = prototypes.version != self.prototypes.version
        self.prototypes, self.synthetic_support_set = prototypes, synthetic
        if self.store is not None:
            self.version_number = store_version
        if changed and self.on_prototypes is not None:
            self.on_prototypes(prototypes.version)
        self.version_set, self._version_problem = number, ""
        logger.info("model version set %d is now in use", number)
        return True

    async def watch_models(self, interval_s: float) -> None:
        """Look at the repository's version set every ``interval_s`` and switch to it (``refresh_models``)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.refresh_models()
            except CspineError as error:  # Triton went away meanwhile: the next look tries again
                self._version_warning(f"model versions: {error}")

    async def add_case(
        self,
        instances: Sequence[tuple[str, bytes]],
        label: str,
        pathology_reference: str,
        note: str,
        create_class: bool,
        curator: str,
    ) -> tuple[Case, VersionInfo]:
        """Analyse a pathology-confirmed case up to its lesion embeddings and add it to the support set: per
        modality the embedding of the lesion matched to the main one by level (``matched_lesions``; a modality
        whose lesions lie elsewhere gives none). The next analysis uses the new prototype set."""
        store = self._store()
        study = await asyncio.to_thread(ingest, instances, self.limits)
        async with self._switching:  # no switch meanwhile: the case is recorded by the embedding that made it
            analysis = await analyze(
                study,
                self.triton,
                self.prototypes,
                self.calibration,
                AnalysisOptions(),
                self.models,
                self.competence,
                limits=self.limits,
            )
            if not analysis.fused.assessed:
                raise InvalidInputError(f"the case is {analysis.fused.status_message}: it cannot be a support case")
            matched, _ = matched_lesions({result.modality: result for result in analysis.modalities})
            embeddings: dict[Modality | str, np.ndarray] = {
                modality: lesion.embedding for modality, lesion in matched.items() if lesion.embedding is not None
            }
            if not analysis.fused.tumor_detected:
                raise InvalidInputError(
                    f"no tumor was detected in the case (detection score {analysis.fused.detection_score:.2f}, "
                    f"below {self.calibration.detection_threshold:g}): a support case needs a lesion to learn from"
                )
            if not embeddings:
                raise InvalidInputError(
                    f"a tumor was detected (detection score {analysis.fused.detection_score:.2f}) but no lesion of "
                    "an assessed modality has an embedding: a support case needs a lesion to learn from"
                )
            number = await asyncio.to_thread(
                lambda: store.add_case(
                    study.study_instance_uid,
                    label,
                    embeddings,
                    pathology_reference=pathology_reference,
                    curator=curator,
                    note=note,
                    create_class=create_class,
                )
            )
        await self.refresh_prototypes()
        added = max(await asyncio.to_thread(store.list_cases, number), key=lambda case: case.id)
        return added, await asyncio.to_thread(store.version_info, number)

    async def remove_case(self, case_id: int, curator: str) -> VersionInfo:
        store = self._store()
        number = await asyncio.to_thread(store.remove_case, case_id, curator)
        await self.refresh_prototypes()
        return await asyncio.to_thread(store.version_info, number)

    async def cases(self, version: int | None) -> tuple[list[Case], VersionInfo, PrototypeSet]:
        store = self._store()
        info = await asyncio.to_thread(store.version_info, version)
        found = await asyncio.to_thread(store.list_cases, info.number)
        if info.number == self.version_number:  # the set in use: made (fitting included) when it was loaded
            return found, info, self.prototypes
        return found, info, await asyncio.to_thread(store.prototype_set, info.number)

    async def ready(self) -> Readiness:
        """Whether Triton answers and serves every model the pipeline calls, and whether the store (if any)
        answers."""
        triton = store = True
        try:
            await self.triton.check_ready(timeout_s=2.0)
        except Exception:  # noqa: BLE001 - any failure to answer means not ready; the reason is logged
            logger.warning("Triton at %s is not ready", self.triton.url)
            triton = False
        if self.store is not None:
            try:
                await asyncio.to_thread(self.store.current_version)
            except CspineError as error:
                logger.warning("the support store does not answer: %s", error)
                store = False
        return Readiness(triton, store)

    def info(self) -> ServiceInfo:
        return ServiceInfo(
            version=cspine.__version__,
            models=self.models,
            prototype_set_version=self.prototypes.version,
            labels=self.prototypes.labels,
            synthetic_support_set=self.synthetic_support_set,
            limits=self.limits,
            max_studies_in_flight=self.max_studies_in_flight,
            max_queued_studies=self.max_queued_studies,
            disclosure=self.competence.disclosure,
        )
