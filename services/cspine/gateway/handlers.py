"""What the gateway's interceptors share to wrap a call: one table of the four kinds of RPC handler (unary or
streaming requests, unary or streaming responses), a handler rebuilt around a new behaviour, and the one way
to run a behaviour, of any shape, with a context variable set."""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc


@dataclass(frozen=True)
class HandlerKind:
    """One kind of RPC handler: how to make one, and the handler's attribute that holds its behaviour."""

    factory: Callable[..., grpc.RpcMethodHandler]
    attribute: str


# (request streaming, response streaming) → the kind of handler
HANDLER_KINDS: dict[tuple[bool, bool], HandlerKind] = {
    (False, False): HandlerKind(grpc.unary_unary_rpc_method_handler, "unary_unary"),
    (False, True): HandlerKind(grpc.unary_stream_rpc_method_handler, "unary_stream"),
    (True, False): HandlerKind(grpc.stream_unary_rpc_method_handler, "stream_unary"),
    (True, True): HandlerKind(grpc.stream_stream_rpc_method_handler, "stream_stream"),
}


def kind_of(handler: grpc.RpcMethodHandler) -> HandlerKind:
    return HANDLER_KINDS[(bool(handler.request_streaming), bool(handler.response_streaming))]


def behaviour_of(handler: grpc.RpcMethodHandler) -> Callable:
    return getattr(handler, kind_of(handler).attribute)


def with_behaviour(handler: grpc.RpcMethodHandler, behaviour: Callable) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind and (de)serialisers that runs ``behaviour`` instead."""
    return kind_of(handler).factory(
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


@contextlib.contextmanager
def _setting(var: contextvars.ContextVar, value: Any) -> Iterator[None]:
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


_DONE = object()


def bind(behaviour: Callable, var: contextvars.ContextVar, value: Any) -> Callable:
    """``behaviour`` run with ``var`` set to ``value``: around the call, and around each step of the responses it
    yields, for each step may run in a context of its own. grpc.aio runs a synchronous behaviour, and each step
    of its generator, in its thread pool, where the call's context does not follow; the loop's finaliser may
    finish an async generator in another context. The result has ``behaviour``'s shape (async generator,
    coroutine function or plain function), which is how grpc.aio decides how to run it."""
    if inspect.isasyncgenfunction(behaviour):

        async def streamed(request, context):
            responses = behaviour(request, context)
            try:
                while True:
                    with _setting(var, value):
                        response = await anext(responses, _DONE)
                    if response is _DONE:
                        return
                    yield response
            finally:
                await responses.aclose()

        return streamed
    if inspect.iscoroutinefunction(behaviour):

        async def awaited(request, context):
            with _setting(var, value):
                return await behaviour(request, context)

        return awaited

    def called(request, context):
        with _setting(var, value):
            result = behaviour(request, context)
        return _stepped(result, var, value) if inspect.isgenerator(result) else result

    return called


def _stepped(responses: Generator, var: contextvars.ContextVar, value: Any) -> Iterator:
    with contextlib.closing(responses):
        while True:
            with _setting(var, value):
                response = next(responses, _DONE)
            if response is _DONE:
                return
            yield response
