"""The one interceptor of the gateway: a request id on every call (from ``x-request-id`` metadata or new),
``CspineError`` categories mapped to gRPC status codes (the only place this happens), unexpected errors
turned into INTERNAL with a generic message (the trace goes to the log, never to the client), and request
counts and latency per RPC; for every kind of call, streaming responses included."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from cspine.errors import (
    AnalysisFailedError,
    CspineError,
    DeadlineExceededError,
    InferenceError,
    InvalidInputError,
    LimitExceededError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from cspine.gateway.handlers import behaviour_of, bind, with_behaviour
from cspine.gateway.metrics import Metrics

logger = logging.getLogger(__name__)

NO_REQUEST_ID = "-"  # outside a call
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default=NO_REQUEST_ID)

# First match wins: FrameTooLargeError is bad input and a limit, and a limit is what the caller can act on.
STATUS_OF_ERROR: tuple[tuple[type[CspineError], grpc.StatusCode], ...] = (
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (LimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (InferenceError, grpc.StatusCode.INTERNAL),
    (AnalysisFailedError, grpc.StatusCode.INTERNAL),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
)


def status_of(error: CspineError) -> grpc.StatusCode:
    return next((code for kind, code in STATUS_OF_ERROR if isinstance(error, kind)), grpc.StatusCode.INTERNAL)


def request_id_of(metadata: dict) -> str:
    """The caller's ``x-request-id`` (at most 64 characters), or a new one."""
    return str(metadata.get("x-request-id") or uuid.uuid4().hex[:16])[:64]


class GatewayInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every call of cspine's services, of any kind (handlers.HANDLER_KINDS): its request id, its errors
    as status codes, its count and latency."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith("/cspine."):
            return handler  # health and reflection pass through
        rpc = handler_call_details.method.rsplit("/", 1)[-1]
        request_id = request_id_of(dict(handler_call_details.invocation_metadata or ()))
        behaviour = behaviour_of(handler)

        async def streamed(request, context: grpc.aio.ServicerContext):
            async with self._handling(rpc, request_id, context):
                responses = behaviour(request, context)
                if inspect.isasyncgen(responses):
                    async for response in responses:
                        yield response
                else:  # a coroutine that writes its responses itself (context.write)
                    await responses

        async def unary(request, context: grpc.aio.ServicerContext):
            async with self._handling(rpc, request_id, context):
                return await behaviour(request, context)

        handled = streamed if handler.response_streaming else unary
        return with_behaviour(handler, bind(handled, REQUEST_ID, request_id))

    @contextlib.asynccontextmanager
    async def _handling(self, rpc: str, request_id: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """The request id sent first; errors turned into status codes; the call counted and timed."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            await context.send_initial_metadata((("x-request-id", request_id),))
            yield
        except CspineError as error:
            code = status_of(error)
            logger.info("%s refused: %s %s", rpc, code.name, error)
            await context.abort(code, f"{error} (request {request_id})")
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except asyncio.CancelledError:  # the client went away: everything it held is released on the way out
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            logger.exception("%s failed", rpc)
            await context.abort(code, f"internal error (request {request_id})")
        finally:
            self.metrics.requests.labels(rpc, code.name).inc()
            self.metrics.latency.labels(rpc).observe(time.perf_counter() - start)


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every log record (``%(request_id)s``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True
