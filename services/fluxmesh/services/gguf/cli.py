"""`fluxmesh quantize`: the function the CLI registers (the typer app lives elsewhere).

Imports nothing heavy until called, so registering it costs the CLI no torch/gguf import.
"""

from __future__ import annotations

from pathlib import Path

from fluxmesh.rpc.errors import InvalidArgument

from .types import Component

__all__ = ["COMPONENTS", "quantize_cli"]

COMPONENTS = tuple(c.value for c in Component)


def quantize_cli(
    source: Path, output: Path, qtype: str, naming: str, component: str = "transformer", *, force: bool = False
) -> Path:
    """Quantize a FLUX transformer (`component="transformer"`) or its T5 encoder (`"t5"`) to GGUF.

    `qtype`: F32, F16, BF16, Q8_0, Q6_K, Q5_K, Q5_1, Q5_0, Q4_K, Q4_1 or Q4_0. `naming` ("bfl" or
    "diffusers") applies to the transformer only; T5 files always use llama.cpp names. Returns the
    written file; bad arguments or files raise fluxmesh errors naming them. An existing output is
    replaced only with `force`, a source file never.
    """
    component = str(getattr(component, "value", component))
    if component == "transformer":
        from .quantize import quantize_transformer

        return quantize_transformer(source, output, qtype, naming, force=force)
    if component == "t5":
        from .quantize import quantize_t5

        return quantize_t5(source, output, qtype, force=force)
    raise InvalidArgument("component", f"{component!r}: choose one of {', '.join(COMPONENTS)}")
