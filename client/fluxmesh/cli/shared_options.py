"""Options several `fluxmesh` commands share, declared once.

Single options that several commands take are `Annotated` aliases (`Model`, `Device`, ...).
Groups of them are dataclasses: every `fluxmesh serve ...` takes the same TLS, token and metrics
flags, the three stage commands the same model and device flags, and every client command the
same TLS and token flags. Rather than repeating a dozen parameters in each command, a command
declares one parameter typed with a group (`serving: ServeOptions = ServeOptions()`) and
`@with_option_groups` expands it into the group's flags for typer, then hands the command the
group back as one object. Typer has no option groups of its own; this is the smallest shim.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from fluxmesh.contract import DEFAULT_MAX_BATCH, ReleaseTo, StartResidency

if typing.TYPE_CHECKING:
    from fluxmesh.orchestrator.priorities import PriorityPolicy
    from fluxmesh.rpc.security import ClientSecurity, ServerSecurity

_PANEL_SERVE = "Security and metrics"
_PANEL_STAGES = "Stage connections (orchestrator -> stages)"
_PANEL_CLIENT = "Connection security"

PathOption = Path | None

# Single options several commands take.
Model = Annotated[str, typer.Option(help="Diffusers-layout model folder or Hub id (HF_TOKEN for gated models).")]
# Loopback unless told otherwise: a server reachable from elsewhere should demand a credential
# (it warns loudly when it does not: fluxmesh.rpc.server).
LOOPBACK_HOST = "127.0.0.1"
Host = Annotated[
    str,
    typer.Option(
        help="Interface to listen on (default loopback only; 0.0.0.0 or [::] for every "
        "interface: then demand a token or client certificates)."
    ),
]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda:N or mps.")]
Dtype = Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16 or float32.")]
Threads = Annotated[
    int | None,
    typer.Option(
        help="torch CPU threads per stage (default: torch's; under `fluxmesh up` the host's cores divided between the "
        "stages; 2 for a stage on a GPU)."
    ),
]
LoraDir = Annotated[PathOption, typer.Option(help="Directory of LoRA .safetensors files requests may name.")]
TransformerGguf = Annotated[
    PathOption, typer.Option(help="GGUF-quantized FLUX transformer (city96/BFL or diffusers names).")
]
T5Gguf = Annotated[PathOption, typer.Option(help="GGUF-quantized T5-XXL encoder (t5encoder architecture).")]
Sequential = Annotated[
    bool,
    typer.Option(
        help="One accelerator for all stages: only one stage's weights on it at a time, requests grouped by phase."
    ),
]
ReleaseToOption = Annotated[
    ReleaseTo,
    typer.Option(
        help="Sequential mode: released weights stay in CPU memory (cpu), are freed and read from disk again (disk), "
        "or auto: cpu for stages on an accelerator, disk for stages on the CPU."
    ),
]
MaxPriority = Annotated[
    int,
    typer.Option(
        help="Highest request priority a caller may use (lower is always allowed); a token file line "
        "'TOKEN max-priority=N' gives that token its own."
    ),
]
MaxBatch = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Denoiser: most images that share one transformer forward per step (continuous batching of "
        f"compatible requests; true CFG counts twice). 1 turns batching off. Default {DEFAULT_MAX_BATCH} "
        "(measured on CPU; a GPU favours more: see docs/benchmarks.md).",
    ),
]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile the model (dynamic shapes), warmed up on --warmup-sizes before health says SERVING.",
    ),
]
WarmupSizes = Annotated[
    str | None,
    typer.Option(
        help="With --compile: WIDTHxHEIGHT sizes compiled before serving, comma-separated. Default 1024x1024."
    ),
]
MaxLoraRank = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="With --compile: rank of the hot-swap slot LoRAs are copied into (no recompile per LoRA); "
        "higher-rank LoRAs are refused. Default 64.",
    ),
]
PromptCacheMib = Annotated[
    int | None,
    typer.Option(
        help="MiB of prompt embeddings the orchestrator keeps (exact: a repeated prompt skips the encoder); "
        "0 turns the cache off. Default 256."
    ),
]
Address = Annotated[str, typer.Option(help="Orchestrator address.")]


@dataclass(frozen=True)
class StageServeOptions:
    """What `fluxmesh serve encoder|denoiser|vae` share: the model, where to listen, device and weights."""

    model: Model
    host: Host = LOOPBACK_HOST
    device: Device = "auto"
    dtype: Dtype = "auto"
    threads: Threads = None
    residency: Annotated[
        StartResidency,
        typer.Option(
            help="Weights at start: resident (on --device), offloaded (CPU memory), released (not read until "
            "Residency.Load), standby (offloaded on an accelerator, released on CPU: what sequential mode uses)."
        ),
    ] = StartResidency.resident


@dataclass(frozen=True)
class ServeOptions:
    """TLS, mutual TLS, bearer token and metrics flags of every `fluxmesh serve` command."""

    tls_cert: Annotated[
        PathOption,
        typer.Option(help="PEM certificate (chain) this server presents; enables TLS.", rich_help_panel=_PANEL_SERVE),
    ] = None
    tls_key: Annotated[
        PathOption, typer.Option(help="PEM private key of --tls-cert.", rich_help_panel=_PANEL_SERVE)
    ] = None
    tls_ca: Annotated[
        PathOption, typer.Option(help="PEM CA that client certificates must chain to.", rich_help_panel=_PANEL_SERVE)
    ] = None
    require_client_cert: Annotated[
        bool,
        typer.Option(
            help="Mutual TLS: refuse clients without a certificate signed by --tls-ca.", rich_help_panel=_PANEL_SERVE
        ),
    ] = False
    token_file: Annotated[
        PathOption,
        typer.Option(
            help="File of accepted bearer tokens, one per line; calls without one are UNAUTHENTICATED.",
            rich_help_panel=_PANEL_SERVE,
        ),
    ] = None
    token_env: Annotated[
        str | None,
        typer.Option(help="Environment variable holding an accepted bearer token.", rich_help_panel=_PANEL_SERVE),
    ] = None
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve Prometheus metrics on this HTTP port (/metrics).", rich_help_panel=_PANEL_SERVE),
    ] = None

    def as_flags(self) -> list[str]:
        """The same options as `fluxmesh serve` flags, for a child process (`fluxmesh up`)."""
        return _as_flags(self)

    def priority_policy(self, max_priority: int) -> PriorityPolicy:
        """The orchestrator's priority ceilings: `max_priority`, and the token file's grants."""
        from fluxmesh.orchestrator.priorities import PriorityPolicy
        from fluxmesh.rpc.security import read_priority_grants

        return PriorityPolicy(max_priority, read_priority_grants(self.token_file) if self.token_file else {})

    def security(self) -> ServerSecurity:
        from fluxmesh.rpc.security import ServerSecurity, read_tokens

        tokens = read_tokens(file=self.token_file, env=self.token_env) if (self.token_file or self.token_env) else ()
        return ServerSecurity(
            cert=self.tls_cert,
            key=self.tls_key,
            ca=self.tls_ca,
            require_client_cert=self.require_client_cert,
            tokens=tokens,
        )


def _as_flags(group: object) -> list[str]:
    """An option group's values as the command-line flags that set them."""
    flags: list[str] = []
    for field in dataclasses.fields(group):  # type: ignore[arg-type]
        value, flag = getattr(group, field.name), "--" + field.name.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value not in (None, False):
            flags += [flag, str(value)]
    return flags


@dataclass(frozen=True)
class AdminTokenOptions:
    """The orchestrator's admin credential: who sees counters, paths, `cached` and server faults
    in full (fluxmesh.orchestrator.disclosure). A file or a variable, never a flag's value: argv
    is visible to every local user."""

    admin_token_file: Annotated[
        PathOption,
        typer.Option(
            help="File of admin bearer tokens, one per line: their callers see LoRA cache state, stage counters, "
            "paths and server faults in full; other token holders do not.",
            rich_help_panel=_PANEL_SERVE,
        ),
    ] = None
    admin_token_env: Annotated[
        str | None,
        typer.Option(help="Environment variable holding an admin bearer token.", rich_help_panel=_PANEL_SERVE),
    ] = None

    def tokens(self) -> tuple[str, ...]:
        from fluxmesh.rpc.security import read_tokens

        if self.admin_token_file is None and self.admin_token_env is None:
            return ()
        return read_tokens(file=self.admin_token_file, env=self.admin_token_env)

    def as_flags(self) -> list[str]:
        return _as_flags(self)


@dataclass(frozen=True)
class StageClientOptions:
    """How the orchestrator reaches its stages: the stages' CA, its client certificate, a stage token."""

    stage_tls_ca: Annotated[
        PathOption,
        typer.Option(
            help="PEM CA the stages' certificates chain to; enables TLS to the stages.", rich_help_panel=_PANEL_STAGES
        ),
    ] = None
    stage_tls_cert: Annotated[
        PathOption,
        typer.Option(help="Client certificate presented to the stages (mutual TLS).", rich_help_panel=_PANEL_STAGES),
    ] = None
    stage_tls_key: Annotated[
        PathOption, typer.Option(help="Private key of --stage-tls-cert.", rich_help_panel=_PANEL_STAGES)
    ] = None
    stage_tls_server_name: Annotated[
        str | None,
        typer.Option(
            help="Name expected in the stages' certificates (default: the address's host).",
            rich_help_panel=_PANEL_STAGES,
        ),
    ] = None
    stage_token_file: Annotated[
        PathOption,
        typer.Option(help="File whose first line is the token sent to stages.", rich_help_panel=_PANEL_STAGES),
    ] = None
    stage_token_env: Annotated[
        str | None,
        typer.Option(help="Environment variable holding the token sent to stages.", rich_help_panel=_PANEL_STAGES),
    ] = None

    def security(self) -> ClientSecurity:
        from fluxmesh.rpc.security import ClientSecurity, read_token

        return ClientSecurity(
            ca=self.stage_tls_ca,
            cert=self.stage_tls_cert,
            key=self.stage_tls_key,
            server_name=self.stage_tls_server_name,
            token=read_token(file=self.stage_token_file, env=self.stage_token_env),
        )


@dataclass(frozen=True)
class ClientOptions:
    """TLS and token flags of the commands that call a server (generate, info, health, ...)."""

    tls: Annotated[
        bool, typer.Option(help="Use TLS with the system's trusted roots.", rich_help_panel=_PANEL_CLIENT)
    ] = False
    tls_ca: Annotated[
        PathOption,
        typer.Option(help="PEM CA the server's certificate chains to; enables TLS.", rich_help_panel=_PANEL_CLIENT),
    ] = None
    tls_cert: Annotated[
        PathOption,
        typer.Option(help="Client certificate, for servers that require mutual TLS.", rich_help_panel=_PANEL_CLIENT),
    ] = None
    tls_key: Annotated[PathOption, typer.Option(help="Private key of --tls-cert.", rich_help_panel=_PANEL_CLIENT)] = (
        None
    )
    token_file: Annotated[
        PathOption,
        typer.Option(help="File whose first line is the bearer token to send.", rich_help_panel=_PANEL_CLIENT),
    ] = None
    token_env: Annotated[
        str | None,
        typer.Option(help="Environment variable holding the bearer token to send.", rich_help_panel=_PANEL_CLIENT),
    ] = None

    allow_plaintext_token: Annotated[
        bool,
        typer.Option(
            help="Send the token even over plaintext to an address beyond loopback (only on a network you trust).",
            rich_help_panel=_PANEL_CLIENT,
        ),
    ] = False

    def security(self) -> ClientSecurity:
        from fluxmesh.rpc.security import ClientSecurity, read_token

        return ClientSecurity(
            ca=self.tls_ca,
            cert=self.tls_cert,
            key=self.tls_key,
            tls=self.tls,
            token=read_token(file=self.token_file, env=self.token_env),
        )

    def client_kwargs(self) -> dict:
        """`credentials=` and `token=` for `fluxmesh.client.Client`."""
        security = self.security()
        return {
            "credentials": security.credentials(),
            "token": security.token,
            "allow_plaintext_token": self.allow_plaintext_token,
        }


_PANEL_LIMITS = "Request limits (lower only)"
_LIMIT_HELP = {  # what each ceiling of fluxmesh.contract.Limits bounds
    "max_side": "Largest width or height in pixels.",
    "max_steps": "Most denoising steps.",
    "max_images": "Most images per request.",
    "max_prompts": "Most prompts in one encoder batch.",
    "max_prompt_chars": "Longest prompt, in characters.",
    "max_sequence_length": "Most T5 tokens.",
    "max_lora_weight": "Largest LoRA weight (absolute).",
    "max_loras": "Most LoRAs per request.",
    "max_true_cfg_scale": "Largest true_cfg_scale.",
    "max_guidance": "Largest guidance.",
    "max_work": "Work budget per request, in megapixel-steps: (width x height + a Kontext reference's pixels) "
    "/ 1024^2 x images x steps run (x 2 with true CFG).",
}


def _limits_group(class_name: str, names: tuple[str, ...] | None = None) -> type:
    """One flag per ceiling of the request contract (`fluxmesh.contract.Limits`), generated from
    it so a new ceiling gets its flag; None keeps the contract's value. `names`: only these."""
    from fluxmesh.contract import LIMITS

    fields = []
    for name in names or tuple(f.name for f in dataclasses.fields(LIMITS) if f.name != "min_side"):
        default, help_text = getattr(LIMITS, name), _LIMIT_HELP.get(name, f"The contract's {name}.")
        kind = int | None if isinstance(default, int) else float | None
        fields.append(
            (
                name,
                Annotated[
                    kind,
                    typer.Option(help=f"{help_text} Default {default:g}; only lower.", rich_help_panel=_PANEL_LIMITS),
                ],
                None,
            )
        )

    def limits(self):
        """The contract's limits with these flags' ceilings lowered (a higher one is refused)."""
        from fluxmesh.contract import LIMITS
        from fluxmesh.rpc.errors import FluxmeshError

        try:
            return LIMITS.lowered(
                **{f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}
            )
        except FluxmeshError as error:  # a usage error: one line, no traceback
            raise typer.BadParameter(error.message) from None

    def as_flags(self) -> list[str]:
        return [
            flag
            for f in dataclasses.fields(self)
            if (v := getattr(self, f.name)) is not None
            for flag in ("--" + f.name.replace("_", "-"), str(v))
        ]  # not :g, which writes 1e+06 for an int

    return dataclasses.make_dataclass(
        class_name, fields, frozen=True, namespace={"limits": limits, "as_flags": as_flags}
    )


RequestLimits = _limits_group("RequestLimits")  # the orchestrator's (and `up`'s)
# What decides whether a request of a given size, count and steps is admitted: `fluxmesh plan`'s.
CostLimits = _limits_group("CostLimits", ("max_side", "max_images", "max_steps", "max_work"))

GROUPS = (
    StageServeOptions,
    ServeOptions,
    AdminTokenOptions,
    StageClientOptions,
    ClientOptions,
    RequestLimits,
    CostLimits,
)


def with_option_groups(command):
    """Expand each parameter typed with an option group into that group's flags (for typer)."""
    hints = typing.get_type_hints(command, include_extras=True)
    parameters: list[inspect.Parameter] = []
    groups: dict[str, type] = {}
    for parameter in inspect.signature(command).parameters.values():
        annotation = hints.get(parameter.name, parameter.annotation)
        if annotation in GROUPS:
            groups[parameter.name] = annotation
            group_hints = typing.get_type_hints(annotation, include_extras=True)
            for field in dataclasses.fields(annotation):
                default = inspect.Parameter.empty if field.default is dataclasses.MISSING else field.default
                parameters.append(
                    inspect.Parameter(
                        field.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=group_hints[field.name]
                    )
                )
        else:
            parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=annotation))

    @functools.wraps(command)
    def expanded(**kwargs):
        for name, group in groups.items():
            kwargs[name] = group(**{field.name: kwargs.pop(field.name) for field in dataclasses.fields(group)})
        from fluxmesh.rpc.errors import FluxmeshError, UsageError

        try:
            return command(**kwargs)
        except UsageError as error:  # the operator's to fix: one line, exit 2, no traceback
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
        except FluxmeshError as error:  # a call's answer (server down, bad input): one line, no traceback
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None

    expanded.__signature__ = inspect.Signature(parameters)
    expanded.__annotations__ = {p.name: p.annotation for p in parameters}
    return expanded
