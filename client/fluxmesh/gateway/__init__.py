"""An OpenAI-compatible images API and a web page, in front of a fluxmesh orchestrator (no torch).

    fluxmesh serve http --orchestrator localhost:50050 --port 8000

Needs the `http` extra (`pip install 'fluxmesh[http]'`): FastAPI, uvicorn and python-multipart.
"""

try:
    import fastapi  # noqa: F401
    import python_multipart  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError(f"fluxmesh.gateway needs the http extra: pip install 'fluxmesh[http]' ({error})") from None

from fluxmesh.gateway.app import GatewayOptions, create_app
from fluxmesh.gateway.server import serve

__all__ = ["GatewayOptions", "create_app", "serve"]
