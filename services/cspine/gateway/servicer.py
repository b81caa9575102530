"""SpineAnalysis and SupportSet servicers: protobuf ⇄ domain and nothing else; the data plane decides
(cspine.service)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import grpc

from cspine.gateway.auth import caller_identity
from cspine.gateway.convert import analysis_to_pb, case_to_pb, info_to_pb, options_from_pb, version_to_pb
from cspine.gateway.interceptors import REQUEST_ID
from cspine.gateway.metrics import Metrics
from cspine.gateway.upload import Upload, UploadError, UploadTimeoutError, UploadTimeouts, read_upload
from cspine.service import AnalysisService
from cspine.v1 import analysis_pb2 as pb
from cspine.v1 import analysis_pb2_grpc as pb_grpc
from cspine.v1 import support_pb2 as spb
from cspine.v1 import support_pb2_grpc as spb_grpc


class UploadReader:
    """Reads an upload within the service's limits and the gateway's timeouts; counts those that time out."""

    def __init__(self, service: AnalysisService, metrics: Metrics, timeouts: UploadTimeouts) -> None:
        self.service = service
        self.metrics = metrics
        self.timeouts = timeouts

    async def __call__(self, rpc: str, messages: AsyncIterator, lead: str) -> Upload:
        try:
            return await read_upload(messages, self.service.limits, lead, self.timeouts)
        except UploadTimeoutError as error:
            self.metrics.upload_timeouts.labels(rpc, error.limit).inc()
            raise


class SpineAnalysisServicer(pb_grpc.SpineAnalysisServicer):
    def __init__(
        self,
        service: AnalysisService,
        metrics: Metrics,
        max_message_bytes: int,
        timeouts: UploadTimeouts = UploadTimeouts(),
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes
        self.timeouts = timeouts
        self.read = UploadReader(service, metrics, timeouts)

    async def AnalyzeStudy(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.StudyAnalysis:  # noqa: N802
        async with self.service.slot():
            with self.metrics.in_flight.track_inprogress():
                upload = await self.read("AnalyzeStudy", self._counted(request_iterator), lead="options")
                if context.cancelled():  # a cancelled stream can end like a complete one: analyse nothing
                    raise asyncio.CancelledError
                options = options_from_pb(upload.lead, context.time_remaining())
                analysis = await self.service.analyze(upload.instances, options)
        self.metrics.observe_stages(analysis.stage_seconds)
        return analysis_to_pb(analysis, REQUEST_ID.get())

    async def GetServiceInfo(self, request, context) -> pb.ServiceInfo:  # noqa: N802
        return info_to_pb(self.service.info(), self.max_message_bytes, self.timeouts)

    async def _counted(self, messages: AsyncIterator[pb.StudyUpload]) -> AsyncIterator[pb.StudyUpload]:
        async for message in messages:
            self.metrics.received.inc(message.ByteSize())
            yield message


class SupportSetServicer(spb_grpc.SupportSetServicer):
    def __init__(self, service: AnalysisService, metrics: Metrics, timeouts: UploadTimeouts = UploadTimeouts()) -> None:
        self.service = service
        self.metrics = metrics
        self.read = UploadReader(service, metrics, timeouts)

    async def AddCase(self, request_iterator, context: grpc.aio.ServicerContext) -> spb.SupportCase:  # noqa: N802
        async with self.service.slot():
            upload = await self.read("AddCase", request_iterator, lead="header")
            if upload.lead is None:
                raise UploadError("the first message of AddCase must be a CaseHeader (label, pathology reference)")
            h = upload.lead
            case, info = await self.service.add_case(
                upload.instances, h.label, h.pathology_reference, h.note, h.create_class, caller_identity()
            )
        return self._case(case, info)

    async def ListCases(self, request: spb.ListCasesRequest, context) -> spb.ListCasesResponse:  # noqa: N802
        cases, info, prototypes = await self.service.cases(request.version or None)
        counts = Counter(c.label for c in cases)
        return spb.ListCasesResponse(
            cases=[case_to_pb(c) for c in cases], prototype_set=version_to_pb(info, prototypes, counts)
        )

    async def RemoveCase(self, request: spb.RemoveCaseRequest, context) -> spb.PrototypeSetInfo:  # noqa: N802
        info = await self.service.remove_case(request.case_id, caller_identity())
        return await self._version(info.number)

    async def GetPrototypeSet(self, request: spb.GetPrototypeSetRequest, context) -> spb.PrototypeSetInfo:  # noqa: N802
        return await self._version(request.version or None)

    async def _version(self, number: int | None) -> spb.PrototypeSetInfo:
        cases, info, prototypes = await self.service.cases(number)
        return version_to_pb(info, prototypes, Counter(c.label for c in cases))

    def _case(self, case, info) -> spb.SupportCase:
        message = case_to_pb(case)
        prototypes = self.service.prototypes
        message.prototype_set.CopyFrom(version_to_pb(info, prototypes, {}))
        return message
