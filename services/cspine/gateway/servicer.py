"""SpineAnalysis servicer: protobuf ⇄ domain and nothing else; the data plane decides (cspine.service)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from cspine.gateway.convert import analysis_to_pb, info_to_pb, options_from_pb
from cspine.gateway.interceptors import REQUEST_ID
from cspine.gateway.metrics import Metrics
from cspine.gateway.upload import read_upload
from cspine.service import AnalysisService
from cspine.v1 import analysis_pb2 as pb
from cspine.v1 import analysis_pb2_grpc as pb_grpc


class SpineAnalysisServicer(pb_grpc.SpineAnalysisServicer):
    def __init__(self, service: AnalysisService, metrics: Metrics, max_message_bytes: int) -> None:
        self.service = service
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes

    async def AnalyzeStudy(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.StudyAnalysis:  # noqa: N802
        async with self.service.slot():
            with self.metrics.in_flight.track_inprogress():
                upload = await read_upload(self._counted(request_iterator), self.service.limits)
                if context.cancelled():  # a cancelled stream can end like a complete one: analyse nothing
                    raise asyncio.CancelledError
                options = options_from_pb(upload.options, context.time_remaining())
                analysis = await self.service.analyze(upload.instances, options)
        self.metrics.observe_stages(analysis.stage_seconds)
        return analysis_to_pb(analysis, REQUEST_ID.get())

    async def GetServiceInfo(self, request, context) -> pb.ServiceInfo:  # noqa: N802
        return info_to_pb(self.service.info(), self.max_message_bytes)

    async def _counted(self, messages: AsyncIterator[pb.StudyUpload]) -> AsyncIterator[pb.StudyUpload]:
        async for message in messages:
            self.metrics.received.inc(message.ByteSize())
            yield message
