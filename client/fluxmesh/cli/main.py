"""The `fluxmesh` command line: the root command, its logging set-up, and its command groups.

Each group of commands is one module of `fluxmesh.cli.commands` holding a `typer.Typer` named
`app`, mounted below:

    serve   `fluxmesh serve encoder|denoiser|vae|orchestrator` (one process in the foreground)
    local   `fluxmesh up`, `fluxmesh demo` (all four processes on this machine)
    calls   `fluxmesh generate|loras|info|health` (calls to a running server)
    tools   `fluxmesh tiny-model|quantize|plan` (offline)

A new command goes into the module of its group (a new kind of server, e.g. `serve http`, into
`serve`); a new group is a new module, added to GROUPS. Options several commands take (single
ones and groups of them) live in `fluxmesh.cli.shared_options`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer

from fluxmesh.cli.commands import calls, local, serve, tools
from fluxmesh.cli.lifeline import die_with_parent_if_asked

app = typer.Typer(
    help="FLUX.1 image generation served as gRPC microservices.", no_args_is_help=True, pretty_exceptions_enable=False
)

# (group, name): a named group is a subcommand (`fluxmesh serve ...`); None adds its commands
# to the root (`fluxmesh up`).
GROUPS: tuple[tuple[typer.Typer, str | None], ...] = (
    (serve.app, "serve"),
    (local.app, None),
    (calls.app, None),
    (tools.app, None),
)
for group, name in GROUPS:
    app.add_typer(group, name=name)


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    die_with_parent_if_asked()  # before anything slow: `fluxmesh up` may be gone already
    # Logging first, before heavy imports, so a failing torch/diffusers import is logged.
    from fluxmesh.rpc.request_ids import install_log_field

    install_log_field()  # every line names the request it is about ("-" when none)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s [%(request_id)s]: %(message)s",
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Weight-loading progress bars and library chatter would bury the stage logs of four processes.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def main() -> None:  # pragma: no cover - console entry point alias
    app(prog_name="fluxmesh")


if __name__ == "__main__":
    sys.exit(main())
