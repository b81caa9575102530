"""The analysis pipeline on an ingested study, run as the service runs it through a real Triton."""

from __future__ import annotations

import asyncio

from cspine.analysis.competence import CompetenceReference
from cspine.analysis.fusion import Calibration
from cspine.fewshot.prototypes import default_prototypes
from cspine.inference.client import TritonClient
from cspine.inference.local_triton import default_repository
from cspine.inference.model_config import model_versions
from cspine.pipeline import AnalysisOptions, analyze


def analyse(triton, study, options=None, prototypes=None, calibration=None):
    """The pipeline on ``study`` through the ``triton`` fixture's server, with everything the service ships: the
    default prototypes (or ``prototypes``), the calibration (or ``calibration``), the model versions and the
    competence reference."""
    repository = default_repository()

    async def go():
        async with TritonClient(triton.grpc_url) as client:
            return await analyze(
                study,
                client,
                prototypes or default_prototypes(),
                calibration or Calibration.load(repository),
                options or AnalysisOptions(),
                model_versions(repository),
                CompetenceReference.load(repository),
            )

    return asyncio.run(go())
