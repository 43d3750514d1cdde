"""Several servers behind one stage: spread calls over them, skip the ones that are down.

A stage address is one target or several, comma-separated:

    gpu1:50052                      one server
    gpu1:50052,gpu2:50052           replicas: one channel each, picked here
    dns:///denoiser.fluxmesh:50052  every address the name resolves to (e.g. a Kubernetes
                                    headless Service): one channel, spread by gRPC's round_robin

Each call goes to the available replica with the fewest calls in flight (ties rotate). Plain
round robin would queue a request behind a 30-second denoise on a busy replica while another
sits idle; counting calls in flight costs one integer. A replica whose call failed with
UNAVAILABLE is skipped for a few seconds, and for as long as its health check says it is down
(`StageMonitor` reports each replica's health here); when every replica is down, calls still try
them so the caller gets the real error.

Retries: a call that fails with UNAVAILABLE is tried once more on each other replica when that
is safe — calls without side effects (Encode, Decode, Info, Status), and a Denoise that has not
sent its first event. A Denoise that had started stepping on a replica that died is not re-run
elsewhere: the client already saw its progress, and a request that kills its replica would
kill the next one too.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc

from fluxmesh.rpc.errors import InvalidArgument

log = logging.getLogger(__name__)

DOWN_SECONDS = 3.0  # how long a replica that failed a call is skipped without a health check saying so

# Calls with no side effects, which gRPC itself retries inside a dns:/// target: the retry goes
# through round_robin again, so usually to another server of the name. (Explicit replicas each
# get their own channel, and the failover below is quicker than gRPC backing off on a dead one.)
_IDEMPOTENT = {
    "fluxmesh.v1.TextEncoder": ["Encode", "Info"],
    "fluxmesh.v1.Denoiser": ["Info", "ListLoras"],
    "fluxmesh.v1.Vae": ["Decode", "Encode", "Info"],
    "fluxmesh.v1.Residency": ["Status"],
}
_ROUND_ROBIN = [{"round_robin": {}}]
_RETRY = {
    "name": [{"service": service, "method": method} for service, methods in _IDEMPOTENT.items() for method in methods],
    "retryPolicy": {
        "maxAttempts": 3,
        "initialBackoff": "0.1s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    },
}


# A stage host that vanishes (cable cut, power lost) sends no reset: its connection would hang
# until the request deadline. A ping unanswered for 5 s (pings every 10 s) drops the connection,
# so calls on it end UNAVAILABLE and the replica is skipped (tests/test_multihost.py).
STAGE_KEEPALIVE = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000)]


def channel_options(target: str) -> list[tuple[str, str]]:
    """round_robin over whatever a target resolves to (a host name can resolve to several
    addresses too), plus gRPC's own retries for dns:/// targets."""
    config = {"loadBalancingConfig": _ROUND_ROBIN}
    if is_dns_target(target):
        config["methodConfig"] = [_RETRY]
    return [("grpc.service_config", json.dumps(config)), *STAGE_KEEPALIVE]


def parse_targets(spec: str, field_name: str = "address") -> list[str]:
    """Split "a:1, b:2" into targets; a dns:/// target stays one target."""
    targets = [part.strip() for part in spec.split(",")]
    if not spec.strip() or any(not target for target in targets):
        raise InvalidArgument(field_name, f"{spec!r}: expected host:port, several comma-separated, or dns:///name:port")
    if len(set(targets)) != len(targets):
        raise InvalidArgument(field_name, f"{spec!r} lists a replica twice")
    return targets


def is_dns_target(target: str) -> bool:
    return target.startswith("dns:")


@dataclass(eq=False)
class Replica:
    target: str
    channel: grpc.aio.Channel
    stub: Any = None  # the stage's stub on this channel
    in_flight: int = 0
    down_until: float = 0.0  # time.monotonic(); math.inf while its health check fails
    calls: int = 0  # calls sent here (for Info/metrics and tests)

    def available(self, now: float) -> bool:
        return self.down_until <= now


@dataclass
class ReplicaSet:
    stage: str
    replicas: list[Replica]
    _turn: int = field(default=0, repr=False)

    @classmethod
    def connect(
        cls, stage: str, spec: str, channel: Callable[[str], grpc.aio.Channel], stub: Callable[[grpc.aio.Channel], Any]
    ) -> ReplicaSet:
        """One replica per target of `spec`; `channel(target)` opens a channel (with whatever
        credentials the caller uses), `stub(channel)` makes the stage's stub."""
        replicas = []
        for target in parse_targets(spec, stage):
            ch = channel(target)
            replicas.append(Replica(target, ch, stub(ch)))
        return cls(stage, replicas)

    def __len__(self) -> int:
        return len(self.replicas)

    def pick(self, tried: Sequence[Replica] = ()) -> Replica:
        """The replica for the next call: available, not yet tried by this call, least busy."""
        now = time.monotonic()
        untried = [r for r in self.replicas if r not in tried] or list(self.replicas)
        pool = [r for r in untried if r.available(now)] or untried
        n = len(self.replicas)
        order = {id(r): i for i, r in enumerate(self.replicas)}
        chosen = min(pool, key=lambda r: (r.in_flight, (order[id(r)] - self._turn) % n))
        self._turn = (order[id(chosen)] + 1) % n
        return chosen

    def can_retry(self, tried: Sequence[Replica]) -> bool:
        return any(r not in tried for r in self.replicas)

    @contextmanager
    def using(self, replica: Replica) -> Iterator[None]:
        replica.in_flight += 1
        replica.calls += 1
        try:
            yield
        finally:
            replica.in_flight -= 1

    def failed(self, replica: Replica, error: grpc.aio.AioRpcError) -> bool:
        """Note a failed call; True when the replica looks gone (worth trying another)."""
        if error.code() != grpc.StatusCode.UNAVAILABLE:
            return False
        if replica.down_until != math.inf:
            replica.down_until = time.monotonic() + DOWN_SECONDS
        if len(self.replicas) > 1:
            log.warning(
                "%s replica %s unavailable (%s); skipping it while it is down",
                self.stage,
                replica.target,
                error.details(),
            )
        return True

    def set_health(self, replica: Replica, serving: bool) -> None:
        """From the health monitor: a replica is skipped exactly while it is not SERVING."""
        replica.down_until = 0.0 if serving else math.inf

    async def close(self) -> None:
        for replica in self.replicas:
            await replica.channel.close()
