"""`fluxmesh serve http`: the OpenAI-compatible images API and the web page (no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fluxmesh.cli.shared_options import ServeOptions, with_option_groups

if TYPE_CHECKING:
    from fluxmesh.cli.supervisor import Cluster

_PANEL = "Connection to the orchestrator"
HttpPort = Annotated[
    int | None,
    typer.Option(help="Also serve the OpenAI images API and the web page on this port (fluxmesh serve http)."),
]


@with_option_groups
def serve_http(
    orchestrator: Annotated[str, typer.Option(help="The orchestrator's address (host:port).")] = "localhost:50050",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    max_body_mib: Annotated[int, typer.Option(help="Largest request body accepted (MiB); larger is 413.")] = 65,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(
            help="An origin whose pages may call this API from a browser (repeatable); none: only the gateway's own "
            "page."
        ),
    ] = None,
    result_ttl: Annotated[float, typer.Option(help="Seconds a response_format=url image stays fetchable.")] = 600.0,
    result_store_mib: Annotated[
        int, typer.Option(help="Memory for response_format=url images (MiB); the oldest go first.")
    ] = 256,
    model_name: Annotated[
        str | None,
        typer.Option(help="The model id /v1/models shows (default: the model folder's name, or its Hub id)."),
    ] = None,
    orchestrator_tls: Annotated[
        bool, typer.Option(help="TLS to the orchestrator with the system's roots.", rich_help_panel=_PANEL)
    ] = False,
    orchestrator_tls_ca: Annotated[
        Path | None,
        typer.Option(help="PEM CA the orchestrator's certificate chains to; enables TLS.", rich_help_panel=_PANEL),
    ] = None,
    orchestrator_tls_cert: Annotated[
        Path | None,
        typer.Option(help="Client certificate for an orchestrator that requires mutual TLS.", rich_help_panel=_PANEL),
    ] = None,
    orchestrator_tls_key: Annotated[
        Path | None, typer.Option(help="Private key of --orchestrator-tls-cert.", rich_help_panel=_PANEL)
    ] = None,
    allow_plaintext_token: Annotated[
        bool,
        typer.Option(
            help="Pass callers' tokens on over plaintext to an orchestrator beyond loopback (only on a network "
            "you trust).",
            rich_help_panel=_PANEL,
        ),
    ] = False,
    serving: ServeOptions = ServeOptions(),
) -> None:
    """OpenAI-compatible images API (/v1/images/generations, /v1/images/edits, /v1/models) and a web page at /.

    Callers' `Authorization: Bearer` tokens go on to the orchestrator, which checks them; with
    --token-file/--token-env the gateway checks them as well. --tls-* serve HTTPS.
    """
    from fluxmesh.rpc.metrics import serve_metrics
    from fluxmesh.rpc.security import ClientSecurity

    security = serving.security()  # a bad TLS or token flag fails here, before anything starts
    upstream = ClientSecurity(
        ca=orchestrator_tls_ca, cert=orchestrator_tls_cert, key=orchestrator_tls_key, tls=orchestrator_tls
    )
    if max_body_mib < 1 or result_store_mib < 1 or result_ttl <= 0:
        raise typer.BadParameter("--max-body-mib and --result-store-mib must be >= 1, --result-ttl > 0")

    from fluxmesh.gateway import GatewayOptions, serve

    options = GatewayOptions(
        orchestrator=orchestrator,
        credentials=upstream.credentials(),
        allow_plaintext_token=allow_plaintext_token,
        tokens=security.tokens,
        max_body_bytes=max_body_mib * 2**20,
        cors_origins=tuple(cors_origin or ()),
        result_store_bytes=result_store_mib * 2**20,
        result_ttl=result_ttl,
        model_name=model_name,
    )
    serve_metrics(serving.metrics_port)
    serve(options, host=host, port=port, security=security)


def start_gateway(cluster: Cluster, *, port: int, host: str, serving: ServeOptions | None = None) -> str:
    """Add `fluxmesh serve http` in front of a local cluster's orchestrator (`up --http-port`,
    `demo --serve`); returns the page's address once the gateway accepts connections.

    The gateway gets up's certificate for HTTPS and trusts it (or --tls-ca) to reach the
    orchestrator over TLS; tokens need no flag, callers' tokens pass through it."""
    from fluxmesh.cli.supervisor import reachable

    serving = serving or ServeOptions()
    args = ["serve", "http", "--orchestrator", cluster.address, "--host", host, "--port", str(port)]
    if serving.require_client_cert:
        raise typer.BadParameter(
            "--http-port with --require-client-cert: the gateway has no client certificate "
            "to show the orchestrator; run `fluxmesh serve http` with --orchestrator-tls-cert"
        )
    if serving.tls_cert is not None:
        args += [
            "--tls-cert",
            str(serving.tls_cert),
            "--tls-key",
            str(serving.tls_key),
            "--orchestrator-tls-ca",
            str(serving.tls_ca or serving.tls_cert),
        ]
    else:
        # The orchestrator listens on one of this machine's own interfaces (up's --host): the
        # tokens the gateway passes on never leave the machine, whatever its address.
        args.append("--allow-plaintext-token")
    where = f"{reachable(host)}:{port}"
    cluster.start("http", args, where, probe_tcp_only=True)
    cluster.wait_serving()
    return f"{'https' if serving.tls_cert else 'http'}://{where}/"


def serve_until_interrupted(cluster: Cluster, command: str) -> None:
    """Until Ctrl-C (or SIGTERM turned into it), restarting children that die (fluxmesh.cli.restarts);
    a child that keeps crashing ends `command` with one line and exit 1."""
    from fluxmesh.cli.restarts import GaveUp, Restarter

    try:
        Restarter(cluster).run()
    except KeyboardInterrupt:
        pass
    except GaveUp as error:
        typer.echo(f"fluxmesh {command}: {error}; stopping the rest", err=True)
        raise typer.Exit(1) from None
