"""Session-wide fixtures: tiny models written once, real service processes started once.

End-to-end tests talk to four real processes on loopback ports (started by tests/mesh.py's
Mesh), shared across the session so the suite stays within minutes on two cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads at test time
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# Each stage process gets one torch thread: four processes share two cores.
STAGE_FLAGS = ["--threads", "1"]


@pytest.fixture(scope="session", autouse=True)
def _one_thread_in_tests():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def dev_model(tmp_path_factory) -> Path:
    from fluxmesh.services.tools.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-dev")


@pytest.fixture(scope="session")
def schnell_model(tmp_path_factory) -> Path:
    from fluxmesh.services.tools.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-schnell", schnell=True)


@pytest.fixture(scope="session")
def dev_cluster(dev_model, tmp_path_factory):
    """encoder, denoiser, vae and orchestrator serving the tiny dev model (a tests/mesh.py Mesh)."""
    from mesh import Mesh

    with Mesh(dev_model, tmp_path_factory.mktemp("dev-cluster-logs")).start_all() as mesh:
        yield mesh


@pytest.fixture(scope="session")
def schnell_cluster(schnell_model, tmp_path_factory):
    from mesh import Mesh

    with Mesh(schnell_model, tmp_path_factory.mktemp("schnell-cluster-logs")).start_all() as mesh:
        yield mesh


@pytest.fixture(scope="session")
def stage_addresses(dev_cluster) -> dict[str, str]:
    return {child.name: child.address for child in dev_cluster.children}


@pytest.fixture(scope="session")
def stage_token(dev_cluster) -> str:
    """The token dev_cluster's stages demand (a Mesh makes one per mesh, as start_local does)."""
    return dev_cluster.stage_token


def stage_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Metadata for calling a stage that demands `token` directly, as its orchestrator does."""
    return (("authorization", f"Bearer {token}"),)


def stage_access(token: str) -> tuple[list[str], dict[str, str]]:
    """Flags and environment of an orchestrator in front of stages that demand `token`."""
    from fluxmesh.rpc.security import STAGE_TOKEN_ENV

    return ["--stage-token-env", STAGE_TOKEN_ENV], {STAGE_TOKEN_ENV: token}
