"""Step-cache choices as every process spells them: `off`, `KIND` or `KIND:THRESHOLD`.

The SDK and CLI turn the text into a request's `cache` field, the denoiser turns that field
(or its --step-cache flag) back into a policy (fluxmesh.services.denoiser.step_cache, which
runs diffusers' hooks). One table of names here, so the three can never disagree.
"""

from __future__ import annotations

import math

from fluxmesh.rpc.errors import InvalidArgument
from fluxmesh.v1 import common_pb2

KINDS = {
    "off": common_pb2.STEP_CACHE_KIND_OFF,
    "first-block": common_pb2.STEP_CACHE_KIND_FIRST_BLOCK,
    "mag": common_pb2.STEP_CACHE_KIND_MAG,
    "taylorseer": common_pb2.STEP_CACHE_KIND_TAYLORSEER,
}
# diffusers' own defaults: FirstBlockCacheConfig.threshold, MagCacheConfig.threshold,
# TaylorSeerCacheConfig.cache_interval
DEFAULT_THRESHOLDS = {"off": 0.0, "first-block": 0.05, "mag": 0.06, "taylorseer": 5.0}


def parse(text: str, field: str = "cache") -> tuple[str, float]:
    """`off`, `KIND` (diffusers' default threshold) or `KIND:THRESHOLD` -> (kind, threshold)."""
    kind, _, threshold = text.strip().partition(":")
    if kind not in KINDS:
        raise InvalidArgument(field, f"{text!r}: the kind must be one of {', '.join(KINDS)}")
    try:
        value = float(threshold) if threshold else DEFAULT_THRESHOLDS[kind]
    except ValueError:
        raise InvalidArgument(field, f"{text!r}: the threshold is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(field, f"{text!r}: the threshold must be finite and >= 0")
    return kind, 0.0 if kind == "off" else value


def to_pb(text: str) -> common_pb2.StepCache:
    kind, threshold = parse(text)
    return common_pb2.StepCache(kind=KINDS[kind], threshold=threshold)


def from_pb(message: common_pb2.StepCache, field: str = "cache") -> tuple[str, float]:
    """A request's `cache` field -> (kind, threshold); errors name the field."""
    names = {value: name for name, value in KINDS.items()}
    if message.kind not in names:
        raise InvalidArgument(
            f"{field}.kind",
            f"{message.kind} is not a step cache kind (off, first-block, mag, "
            "taylorseer); leave the field unset for the server's default",
        )
    if not math.isfinite(message.threshold) or message.threshold < 0:
        raise InvalidArgument(f"{field}.threshold", f"{message.threshold} must be finite and >= 0")
    return names[message.kind], message.threshold
