"""Step caching, opt-in per request, through diffusers' own cache hooks.

    first-block  FirstBlockCacheConfig(threshold): when the first block's residual changed by
                 less than `threshold` (relative mean) since the last full step, every other
                 block is skipped and its cached residual reused.
    mag          MagCacheConfig(threshold, FLUX_MAG_RATIOS interpolated to the request's steps):
                 blocks skipped while the accumulated magnitude-ratio error stays below it.
    taylorseer   TaylorSeerCacheConfig(cache_interval=threshold): attention outputs predicted by
                 a Taylor expansion between full computations every `threshold` steps.

Kind "off" or threshold 0 installs nothing: today's pixels exactly.

The hooks hold their state in the shared transformer and decide per forward (FirstBlockCache
takes one mean over the whole batch), so a batch-mate would change a caching request's image:
a caching request runs alone, all its steps in a row, hooks installed at its first step and
removed after its last (batching.Batcher). What was skipped is counted by `AttentionCounter`:
forward hooks on every block's attention query projection, which runs only when the block's
attention is really computed — a skipped block (first-block, mag) or a predicted attention
(taylorseer) never calls it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fluxmesh.rpc import step_cache as step_cache_names
from fluxmesh.rpc.errors import InvalidArgument

__all__ = ["KINDS", "AttentionCounter", "StepCacheLimits", "StepCachePolicy", "parse_policy", "policy_from_pb"]

KINDS = tuple(step_cache_names.KINDS)


@dataclass(frozen=True)
class StepCachePolicy:
    kind: str = "off"
    threshold: float = 0.0

    @property
    def off(self) -> bool:
        return self.kind == "off" or self.threshold == 0

    def key(self) -> tuple:
        return () if self.off else (self.kind, self.threshold)

    def config(self, steps: int):
        """The diffusers cache config for a request of `steps` steps."""
        from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

        if self.kind == "first-block":
            return FirstBlockCacheConfig(threshold=self.threshold)
        if self.kind == "mag":
            from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

            return MagCacheConfig(threshold=self.threshold, num_inference_steps=steps, mag_ratios=FLUX_MAG_RATIOS)
        if self.kind == "taylorseer":
            return TaylorSeerCacheConfig(cache_interval=int(self.threshold))
        raise ValueError(f"no cache config for {self.kind!r}")


@dataclass(frozen=True)
class StepCacheLimits:
    """The server's side: the policy for requests that ask none, and the largest threshold."""

    default: StepCachePolicy = StepCachePolicy()
    ceiling: float = 1.0  # for first-block and mag (a relative tolerance)

    def resolve(self, asked: StepCachePolicy | None) -> StepCachePolicy:
        """The request's policy (or the default), checked; errors name the field."""
        policy = asked if asked is not None else self.default
        if policy.kind not in KINDS:
            raise InvalidArgument("cache.kind", f"{policy.kind!r}; expected one of {', '.join(KINDS)}")
        if policy.kind == "taylorseer":  # a whole number of steps, not a tolerance: no ceiling
            if policy.threshold != int(policy.threshold) or policy.threshold < 0:
                raise InvalidArgument(
                    "cache.threshold",
                    f"{policy.threshold}: taylorseer's is a whole number of steps between full computations",
                )
        elif not 0 <= policy.threshold <= self.ceiling:  # also false for NaN
            raise InvalidArgument(
                "cache.threshold", f"{policy.threshold} is outside [0, {self.ceiling:g}] (this server's ceiling)"
            )
        return policy


def parse_policy(text: str) -> StepCachePolicy:
    """`off`, `KIND` or `KIND:THRESHOLD` (the --step-cache flag)."""
    return StepCachePolicy(*step_cache_names.parse(text, "--step-cache"))


def policy_from_pb(message) -> StepCachePolicy:
    """A request's `cache` field (common_pb2.StepCache); errors name the field."""
    return StepCachePolicy(*step_cache_names.from_pb(message))


class AttentionCounter:
    """Counts attention computations really run in the transformer's blocks while installed."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self.blocks = [
            block.attn.to_q
            for name in ("transformer_blocks", "single_transformer_blocks")
            for block in getattr(transformer, name, [])
        ]
        self.run = 0
        self.forwards = 0
        self._handles: list = []

    def __enter__(self) -> AttentionCounter:
        self._handles = [module.register_forward_hook(self._count) for module in self.blocks]
        self._handles.append(self.transformer.register_forward_pre_hook(self._forward))
        return self

    def _forward(self, *_) -> None:
        self.forwards += 1

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _count(self, *_) -> None:
        self.run += 1

    @property
    def skipped(self) -> int:
        return self.forwards * len(self.blocks) - self.run
