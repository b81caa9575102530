"""The API's closed sets ⇄ the domain's, defined once for both sides: the gateway (``gateway/convert.py``) and the
client (``client/decode.py``, the commands) convert through these tables."""

from __future__ import annotations

from cspine import domain
from cspine.v1 import analysis_pb2 as pb

MODALITY_TO_PB: dict[domain.Modality | None, pb.Modality] = {
    None: pb.MODALITY_UNSPECIFIED,
    domain.Modality.CT: pb.CT,
    domain.Modality.MR: pb.MR,
    domain.Modality.XR: pb.XR,
}
MODALITY_FROM_PB: dict[pb.Modality, domain.Modality | None] = {v: k for k, v in MODALITY_TO_PB.items()}
# AnalysisOptions.modalities by the lower-case names commands take (--modalities ct,mr)
MODALITY_BY_NAME: dict[str, pb.Modality] = {m.value.lower(): v for m, v in MODALITY_TO_PB.items() if m is not None}
MODALITY_NAMES: dict[pb.Modality, str] = {v: m.value for m, v in MODALITY_TO_PB.items() if m is not None}

STATUS_TO_PB: dict[domain.AssessmentStatus, pb.AssessmentStatus] = {
    domain.AssessmentStatus.ASSESSED: pb.ASSESSED,
    domain.AssessmentStatus.NOT_ASSESSABLE: pb.NOT_ASSESSABLE,
}
STATUS_FROM_PB: dict[pb.AssessmentStatus, domain.AssessmentStatus] = {v: k for k, v in STATUS_TO_PB.items()}
