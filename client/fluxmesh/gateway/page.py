"""The web page's files, shipped inside the package (nothing is fetched from elsewhere at run time)."""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi.responses import Response

from fluxmesh.gateway.errors import GatewayError

ASSETS = {"page.js": "text/javascript", "page.css": "text/css"}
# The page is all our own: scripts, styles and images from this origin only (previews are data: URLs).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)


@cache
def read(name: str) -> str:
    return resources.files("fluxmesh.gateway").joinpath("static", name).read_text(encoding="utf-8")


def asset(name: str) -> Response:
    if name not in ASSETS:
        raise GatewayError(404, f"no such page file: {name}", code="not_found")
    return Response(read(name), media_type=ASSETS[name], headers={"Content-Security-Policy": CSP})
