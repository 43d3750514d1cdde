"""What one caller of the public API may learn about the server and the other callers.

Where several tenants share an orchestrator, `ListLoras`' `cached` says which LoRAs others used
lately, `Info`'s counters and memory figures how busy the stages are and with what, its paths
how the server's disks are laid out, and a server fault's message (exception text, stage
addresses) the server's insides. That full view is the operator's: a caller holding the admin
credential (`--admin-token-file` / `--admin-token-env`) gets it. Every other caller gets the
tenant view: LoRAs without `cached`, stages without paths, counters, memory or residency, and
server faults as their code, the failing stage and a request id (the full message goes to the
log under that id; fluxmesh.rpc.interceptors).

An orchestrator that demands no credential at all (no client token, no client certificate, no
admin token) cannot tell its callers apart, so there are no tenants to keep apart: every caller
gets the full view, as a single user on loopback expects. Giving it an admin token makes
everyone else a tenant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fluxmesh.contract import model_id
from fluxmesh.rpc.security import ServerSecurity, presented_token, token_matches
from fluxmesh.v1 import common_pb2, generator_pb2

Metadata = Sequence[tuple[str, str | bytes]]

# StageInfo fields that describe the server's use rather than the model served: how busy it is
# (details' counters, peak memory, weight bytes and residency move with other callers' requests)
# and the encoder's cache identity (a fingerprint of its files). Cleared for tenants.
_USAGE_FIELDS = ("details", "weight_bytes", "peak_memory_bytes", "residency", "identity")
# Paths on the server's disks: tenants see the file or folder's name only.
_PATH_FIELDS = ("model", "transformer_gguf")


@dataclass(frozen=True)
class Disclosure:
    admin_tokens: tuple[str, ...] = field(default=(), repr=False)
    everyone_admin: bool = True  # no credential tells callers apart (see the module's docstring)

    @classmethod
    def of(cls, security: ServerSecurity, admin_tokens: Sequence[str]) -> Disclosure:
        return cls(tuple(admin_tokens), everyone_admin=not admin_tokens and not security.authenticates)

    def full_view(self, metadata: Metadata | None) -> bool:
        """Whether the caller of a call with this metadata sees everything (constant-time check)."""
        return self.everyone_admin or token_matches(presented_token(metadata), self.admin_tokens)

    def info(self, info: generator_pb2.GeneratorInfo, metadata: Metadata | None) -> generator_pb2.GeneratorInfo:
        if self.full_view(metadata):
            return info
        tenant = generator_pb2.GeneratorInfo()
        tenant.CopyFrom(info)
        for stage in tenant.stages:
            for name in _USAGE_FIELDS:
                stage.ClearField(name)
            for name in _PATH_FIELDS:
                setattr(stage, name, model_id(getattr(stage, name)))
        return tenant

    def loras(self, reply: common_pb2.ListLorasResponse, metadata: Metadata | None) -> common_pb2.ListLorasResponse:
        if self.full_view(metadata):
            return reply
        # `cached` is what other callers used lately; name and size are the catalogue itself.
        return common_pb2.ListLorasResponse(
            loras=[common_pb2.LoraInfo(name=lora.name, size_bytes=lora.size_bytes) for lora in reply.loras]
        )
