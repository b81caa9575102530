"""What the fault scenarios break, and the server they break it under: ``cspine serve`` as a child process on
the session's Triton, a small tmpfs that can be filled, and a TCP proxy that delays or stalls every packet
between cspine and its store. The PostgreSQL cluster a scenario stops and starts is support.postgres's."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cspine.gateway.tokens import Role
from cspine.ops.embedded import EmbeddedServer
from support.tokens import served_token


@dataclass(frozen=True)
class Served:
    """A running ``cspine serve``: where it listens, its data directory and log."""

    address: str
    data_dir: Path
    log: Path

    def token(self, role: Role = Role.CURATOR) -> str:
        return served_token(self.data_dir, role)


@contextmanager
def serve(data_dir: Path, log: Path, triton_url: str, *args: str) -> Iterator[Served]:
    """``cspine serve`` (gateway and store; ``args`` as on its command line) on the Triton at ``triton_url``,
    SERVING when entered and stopped with SIGTERM on the way out. Its log stays at ``log``."""
    with EmbeddedServer(data_dir, log, ["--triton-url", triton_url, *args]) as server:
        yield Served(server.address, data_dir, log)


class Tmpfs:
    """A tmpfs of ``size_bytes`` mounted at ``path`` (root only): a disk a scenario can fill and free."""

    def __init__(self, path: Path, size_bytes: int) -> None:
        self.path = path
        self.size_bytes = size_bytes
        self.filler = path / "filler"

    def __enter__(self) -> Tmpfs:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size_bytes},mode=0755", "tmpfs", str(self.path)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        return self

    def __exit__(self, *exc) -> None:
        result = subprocess.run(["umount", str(self.path)], capture_output=True, timeout=30)
        if result.returncode != 0:  # still open by a process on its way out: detach now, freed when closed
            subprocess.run(["umount", "-l", str(self.path)], check=True, capture_output=True, timeout=30)

    def free_bytes(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize

    def fill(self) -> int:
        """Writes the filler until no byte more fits; returns its size."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for chunk in (1 << 20, 4096, 1):
                block = b"\0" * chunk
                while True:
                    try:
                        if os.write(fd, block) < chunk:
                            break
                    except OSError as error:
                        if error.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)
        return self.filler.stat().st_size

    def free(self) -> None:
        self.filler.unlink()


class LatencyProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target_port``: every chunk waits ``delay_s`` in each direction
    (order kept), and ``stall()`` stops forwarding anything — connections stay open, new ones are accepted
    and hear nothing — until ``resume()``, which lets what was held through."""

    def __init__(self, target_port: int, delay_s: float = 0.0) -> None:
        self.target_port = target_port
        self.delay_s = delay_s
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    def __enter__(self) -> LatencyProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def stall(self) -> None:
        self.loop.call_soon_threadsafe(self._flowing.clear)

    def resume(self) -> None:
        self.loop.call_soon_threadsafe(self._flowing.set)

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _connection(self, client_reader, client_writer) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        writers = [client_writer]
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            writers.append(server_writer)
            await asyncio.gather(self._pump(client_reader, server_writer), self._pump(server_reader, client_writer))
        except (OSError, asyncio.CancelledError):
            pass  # one side went away, or the proxy closes: the connection ends (a task that ends cancelled
            # would make asyncio's stream callback raise)
        finally:
            for writer in writers:
                writer.close()
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def forward() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                await self._flowing.wait()
                if not data:
                    writer.write_eof() if writer.can_write_eof() else writer.close()
                    return
                writer.write(data)
                await writer.drain()

        forwarding = asyncio.ensure_future(forward())
        try:
            while True:
                data = await reader.read(65536)
                await queue.put((time.monotonic() + self.delay_s, data))
                if not data:
                    break
            await forwarding
        finally:
            forwarding.cancel()
            await asyncio.gather(forwarding, return_exceptions=True)
