"""One model across processes: `jax.distributed`, and the channel that keeps the followers in lockstep.

Data flow: process 0 (the leader) runs the event loop, the scheduler and the API. Its runner is a
`LeaderRunner`, which sends every runner call that runs on the mesh (a step with its `ScheduledBatch`,
warm-up, a fresh runner on restart) to each follower over a TCP channel, then runs it itself. The
followers (`follow`) run the same calls on the same inputs, so every process enters the same jitted
computations in the same order (the collectives inside need every process); they drop the results
and answer no client. The channel listens on the coordinator's host, at the coordinator's port + 1.

Failure: a follower whose connection is closed (it exited or died) fails the leader's next call with
`FollowerLost`, which fails the engine (503 engine_unavailable); a follower that dies inside a step
leaves that step to the engine's watchdog (`step_timeout_s`). A leader that goes away closes the
channel, and its followers exit.
"""

from __future__ import annotations

import logging
import pickle
import socket
import struct
import time
from typing import Optional

from kvloom.engine.config import EngineConfig, ParallelConfig

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!Q")
CONNECT_TIMEOUT_S = 300.0


class FollowerLost(RuntimeError):
    """A follower process is gone: the model's other shards cannot run."""


def initialize(parallel: ParallelConfig) -> None:
    """Join the processes of one model (call before any other JAX use); CPU collectives over gloo."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(parallel.coordinator, parallel.num_processes, parallel.process_id)


def channel_address(parallel: ParallelConfig) -> tuple[str, int]:
    host, port = parallel.coordinator.rsplit(":", 1)
    return host, int(port) + 1


def _send(sock: socket.socket, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> Optional[bytes]:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket):
    """The next message, or None when the other side closed the connection."""
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    data = _recv_exact(sock, _HEADER.unpack(header)[0])
    return None if data is None else pickle.loads(data)


class LeaderChannel:
    """Process 0's end: one connection per follower, accepted at start-up."""

    def __init__(self, parallel: ParallelConfig, timeout: float = CONNECT_TIMEOUT_S):
        self._followers: dict[int, socket.socket] = {}
        with socket.create_server(channel_address(parallel)) as server:
            server.settimeout(timeout)
            while len(self._followers) < parallel.num_processes - 1:
                conn, _ = server.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                process_id = _recv(conn)
                self._followers[process_id] = conn
        log.info("followers connected: processes %s", sorted(self._followers))

    def broadcast(self, message) -> None:
        """Send `message` to every follower; FollowerLost when one is gone."""
        for process_id, conn in self._followers.items():
            try:
                if self._closed_by_peer(conn):
                    raise ConnectionResetError("connection closed")
                _send(conn, message)
            except OSError as exc:
                raise FollowerLost(f"process {process_id} of the model is gone ({exc})") from None

    @staticmethod
    def _closed_by_peer(conn: socket.socket) -> bool:
        """Followers never write, so a readable connection is one the follower closed."""
        try:
            return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False

    def close(self) -> None:
        for conn in self._followers.values():
            conn.close()
        self._followers.clear()


class LeaderRunner:
    """Process 0's runner: each call that runs on the mesh goes to the followers first."""

    def __init__(self, runner, channel: LeaderChannel):
        self._local, self._channel = runner, channel

    def __getattr__(self, name):
        return getattr(self._local, name)

    def step(self, batch):
        self._channel.broadcast(("step", batch))
        return self._local.step(batch)

    def warmup(self):
        self._channel.broadcast(("warmup", None))
        return self._local.warmup()

    def fresh(self) -> "LeaderRunner":
        self._channel.broadcast(("fresh", None))
        return LeaderRunner(self._local.fresh(), self._channel)


def leader_runner_factory(channel: LeaderChannel):
    """An `Engine` runner factory for process 0."""
    def make(config: EngineConfig, plan):
        from kvloom.engine.runner import ModelRunner

        return LeaderRunner(ModelRunner(config, plan), channel)
    return make


def _connect(parallel: ParallelConfig, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection(channel_address(parallel), timeout=5.0)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # the leader has not bound its channel yet
    sock.settimeout(None)
    _send(sock, parallel.process_id)
    return sock


def follow(config: EngineConfig, timeout: float = CONNECT_TIMEOUT_S) -> int:
    """A follower's whole life: run process 0's runner calls until it closes the channel; returns 0."""
    from kvloom.engine.buckets import BucketPlan
    from kvloom.engine.runner import ModelRunner

    sock = _connect(config.parallel, timeout)
    try:
        plan = BucketPlan.from_config(config.scheduler, config.scoring, config.speculative)
        runner = ModelRunner(config, plan)
        while (message := _recv(sock)) is not None:
            kind, batch = message
            if kind == "step":
                runner.step(batch)
            elif kind == "warmup":
                runner.warmup()
            elif kind == "fresh":
                runner = runner.fresh()
        log.info("process 0 closed the channel; exiting")
        return 0
    finally:
        sock.close()
