"""Who may jump the line.

A request's `priority` moves it ahead of others waiting for the stages, so where several
tenants share a GPU it is a privilege, not a request field anyone may set high. Every caller
may use priorities up to `--max-priority` (default 10; lower is always allowed); a token file
can grant a token its own ceiling, higher or lower (`TOKEN max-priority=N`). A request above its
caller's ceiling is refused with PERMISSION_DENIED naming the field, before it takes a place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fluxmesh.rpc.errors import PermissionDenied

DEFAULT_MAX_PRIORITY = 10


@dataclass(frozen=True)
class PriorityPolicy:
    max_priority: int = DEFAULT_MAX_PRIORITY  # for callers without a grant of their own
    grants: Mapping[str, int] = field(default_factory=dict)  # token -> its ceiling

    def check(self, priority: int, token: str | None) -> None:
        ceiling = self.grants.get(token, self.max_priority) if token is not None else self.max_priority
        if priority > ceiling:
            who = "this token" if token is not None and token in self.grants else "callers without a grant"
            raise PermissionDenied("priority", f"{priority} is above {ceiling}, the most {who} may use")
