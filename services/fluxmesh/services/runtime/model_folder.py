"""Find a model folder: a local diffusers-layout directory, or a Hub id fetched once.

A stage downloads only the subfolders it uses (the VAE service never pulls the 24 GB
transformer). Hub access uses huggingface_hub's own token handling (HF_TOKEN), and honours
HF_HUB_OFFLINE; tests only ever pass local folders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fluxmesh.rpc.errors import FailedPrecondition, NotFound

STAGE_SUBFOLDERS = {
    "encoder": ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "transformer/config.json"],
    "denoiser": ["transformer", "scheduler", "vae/config.json"],
    "vae": ["vae"],
    "redux": ["image_encoder", "feature_extractor", "image_embedder"],  # a FLUX.1-Redux folder (encoder --redux)
}


_MODEL = {
    "what": "model",
    "marker": "model_index.json",
    "expected": "a diffusers-layout folder",
    "example": "black-forest-labs/FLUX.1-dev",
}


def resolve_model(model: str, stage: str) -> Path:
    patterns = ["model_index.json"]
    for sub in STAGE_SUBFOLDERS[stage]:
        patterns.append(sub if sub.endswith(".json") else f"{sub}/*")
    return resolve_folder(model, **_MODEL, patterns=patterns)


def check_model(model: str) -> Path | None:
    """The local folder `model` names (None: a Hub id), or the error a stage would answer with;
    reads no weights and downloads nothing (`fluxmesh up` asks before it starts four processes)."""
    return local_folder(model, **_MODEL)


def local_folder(source: str, *, what: str, marker: str, expected: str, example: str) -> Path | None:
    """The local folder `source` names, holding `marker`; None when it is a Hub id instead."""
    path = Path(source).expanduser()
    if path.exists():
        if not (path / marker).is_file():
            raise FailedPrecondition(f"{what} {source!r}: no {marker}; expected {expected}")
        return path.resolve()
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise NotFound(f"{what} {source!r}: no such folder (and not a Hub id like {example})")
    return None


def resolve_folder(source: str, *, what: str, marker: str, expected: str, example: str, patterns: list[str]) -> Path:
    """A local folder holding `marker`, or a Hub id whose files matching `patterns` are fetched."""
    local = local_folder(source, what=what, marker=marker, expected=expected, example=example)
    if local is not None:
        return local
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=patterns))


def read_index(folder: Path) -> dict[str, Any]:
    """The folder's model_index.json (its `_class_name` names the pipeline the model is for)."""
    return json.loads((folder / "model_index.json").read_text())


def read_config(folder: Path, component: str) -> dict[str, Any]:
    """A component's config.json (or scheduler_config.json), e.g. read_config(folder, "vae")."""
    for name in ("config.json", "scheduler_config.json"):
        path = folder / component / name
        if path.is_file():
            return json.loads(path.read_text())
    raise FailedPrecondition(f"model folder {folder}: {component}/config.json is missing")


def vae_scale_factor(folder: Path) -> int:
    """As FluxPipeline computes it: 2 ** (number of VAE blocks - 1); 8 for real FLUX."""
    return 2 ** (len(read_config(folder, "vae")["block_out_channels"]) - 1)


def has_guidance_embeds(folder: Path) -> bool:
    """FLUX.1-dev-style (guidance-distilled) transformers embed the guidance; schnell does not."""
    return bool(read_config(folder, "transformer").get("guidance_embeds", False))


def default_max_sequence_length(folder: Path) -> int:
    """512 tokens for dev-style models, 256 for schnell, as the model cards say."""
    return 512 if has_guidance_embeds(folder) else 256
