"""LoRA files for the tiny FLUX model, in each naming the community ships.

Every writer is deterministic (seeded) and sizes its tensors from the model folder, so the same
call writes the same bytes and the file fits whatever `write_tiny_model` wrote. Up-projections
are sized so delta-W is about the size of W or larger, so the effect shows in pixels.

Which layers each format carries follows what the real files carry *and* what diffusers'
converter accepts on a tiny model:

* diffusers/PEFT: any linear layer (`transformer.<module>.lora_A/B`), CLIP as
  `text_encoder.text_model.…`; rank/alpha may come from the `lora_adapter_metadata` header.
* kohya/sd-scripts: double blocks (qkv, proj, mlp, mod) and single blocks (linear2, modulation)
  with `.alpha`, CLIP as `lora_te1_…`. No `single_blocks_N_linear1`: diffusers splits it with
  FLUX.1's hard-coded widths (3072·3 + 12288), which a tiny model cannot match.
* XLabs: double blocks only (`processor.qkv_lora1/2`, `proj_lora1/2`), as XLabs ships them;
  their single-block `proj_lora` maps onto `proj_out`, whose input FLUX widens with the MLP.
* BFL (`diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`): the kohya layer set with
  PEFT suffixes and no alpha (as ai-toolkit writes it); no `linear1` for the same reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

FORMATS = ("peft", "kohya", "xlabs", "bfl")


@dataclass(frozen=True)
class Dims:
    inner: int  # heads * head_dim
    mlp: int  # FLUX MLP ratio 4
    double: int
    single: int
    clip_width: int
    clip_ff: int
    clip_layers: int
    linears: dict[str, tuple[int, int]]  # transformer linear module -> (out, in)

    @classmethod
    def of(cls, model_dir: str | Path) -> Dims:
        from safetensors import safe_open

        root = Path(model_dir)
        t = json.loads((root / "transformer" / "config.json").read_text())
        c = json.loads((root / "text_encoder" / "config.json").read_text())
        linears = {}
        with safe_open(str(root / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                if key.endswith(".weight") and len(shape) == 2:
                    linears[key[: -len(".weight")]] = (shape[0], shape[1])
        inner = t["num_attention_heads"] * t["attention_head_dim"]
        return cls(
            inner=inner,
            mlp=inner * 4,
            double=t["num_layers"],
            single=t["num_single_layers"],
            clip_width=c["hidden_size"],
            clip_ff=c["intermediate_size"],
            clip_layers=c["num_hidden_layers"],
            linears=dict(sorted(linears.items())),
        )

    def clip_linears(self) -> dict[str, tuple[int, int]]:
        w, ff = self.clip_width, self.clip_ff
        out = {}
        for i in range(self.clip_layers):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                out[f"text_model.encoder.layers.{i}.self_attn.{proj}"] = (w, w)
            out[f"text_model.encoder.layers.{i}.mlp.fc1"] = (ff, w)
            out[f"text_model.encoder.layers.{i}.mlp.fc2"] = (w, ff)
        return out

    def bfl_linears(self) -> dict[str, tuple[int, int]]:
        """BFL module names (as kohya/BFL/XLabs see FLUX) -> (out, in), without linear1."""
        d, m = self.inner, self.mlp
        out = {}
        for i in range(self.double):
            for s in ("img", "txt"):
                out[f"double_blocks.{i}.{s}_attn.qkv"] = (3 * d, d)
                out[f"double_blocks.{i}.{s}_attn.proj"] = (d, d)
                out[f"double_blocks.{i}.{s}_mlp.0"] = (m, d)
                out[f"double_blocks.{i}.{s}_mlp.2"] = (d, m)
                out[f"double_blocks.{i}.{s}_mod.lin"] = (6 * d, d)
        for i in range(self.single):
            out[f"single_blocks.{i}.linear2"] = (d, d + m)
            out[f"single_blocks.{i}.modulation.lin"] = (3 * d, d)
        return out


class _Pairs:
    """Seeded (down, up) pairs: down ~ N(0, 1/in), up ~ N(0, strength²/rank)."""

    def __init__(self, seed: int, rank: int, strength: float) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.rank, self.strength = rank, strength

    def __call__(self, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        down = torch.randn(self.rank, in_features, generator=self.g) / in_features**0.5
        up = torch.randn(out_features, self.rank, generator=self.g) * (self.strength / self.rank**0.5)
        return down.contiguous(), up.contiguous()


def _save(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def write_peft_lora(
    path: str | Path,
    model_dir: str | Path,
    seed: int,
    *,
    rank: int = 4,
    alpha: float | None = None,
    strength: float = 1.0,
    text_encoder: bool = True,
) -> Path:
    """diffusers/PEFT naming on every linear layer; `alpha` goes into `lora_adapter_metadata`."""
    dims = Dims.of(model_dir)
    pairs = _Pairs(seed, rank, strength)
    sd = {}
    for module, (o, i) in dims.linears.items():
        sd[f"transformer.{module}.lora_A.weight"], sd[f"transformer.{module}.lora_B.weight"] = pairs(o, i)
    if text_encoder:
        for module, (o, i) in dims.clip_linears().items():
            sd[f"text_encoder.{module}.lora_A.weight"], sd[f"text_encoder.{module}.lora_B.weight"] = pairs(o, i)
    metadata = None
    if alpha is not None:
        # What diffusers' save_lora_weights writes: a LoraConfig per component, prefixed.
        config = {"transformer": list(dims.linears)}
        if text_encoder:
            config["text_encoder"] = [m.removeprefix("text_model.") for m in dims.clip_linears()]
        packed = {}
        for component, modules in config.items():
            for k, v in {"r": rank, "lora_alpha": alpha, "target_modules": modules}.items():
                packed[f"{component}.{k}"] = v
        metadata = {"lora_adapter_metadata": json.dumps(packed), "format": "pt"}
    return _save(sd, path, metadata)


def write_kohya_lora(
    path: str | Path,
    model_dir: str | Path,
    seed: int,
    *,
    rank: int = 4,
    alpha: float | None = 2.0,
    strength: float = 2.0,
    text_encoder: bool = True,
) -> Path:
    """sd-scripts naming: `lora_unet_double_blocks_0_img_attn_qkv.lora_down/.lora_up/.alpha`."""
    dims = Dims.of(model_dir)
    pairs = _Pairs(seed, rank, strength)
    sd = {}
    modules = {"lora_unet_" + m.replace(".", "_"): s for m, s in dims.bfl_linears().items()}
    if text_encoder:
        modules.update({"lora_te1_" + m.replace(".", "_"): s for m, s in dims.clip_linears().items()})
    for name, (o, i) in modules.items():
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = pairs(o, i)
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    return _save(sd, path, {"ss_network_module": "networks.lora_flux", "ss_network_dim": str(rank)})


def write_xlabs_lora(
    path: str | Path, model_dir: str | Path, seed: int, *, rank: int = 4, strength: float = 2.0
) -> Path:
    """XLabs naming: `double_blocks.0.processor.qkv_lora1.down.weight` (1 = image, 2 = text)."""
    dims = Dims.of(model_dir)
    pairs = _Pairs(seed, rank, strength)
    d = dims.inner
    sd = {}
    for i in range(dims.double):
        for proc, (o, n) in {
            "qkv_lora1": (3 * d, d),
            "proj_lora1": (d, d),
            "qkv_lora2": (3 * d, d),
            "proj_lora2": (d, d),
        }.items():
            key = f"double_blocks.{i}.processor.{proc}"
            sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = pairs(o, n)
    return _save(sd, path)


def write_bfl_lora(path: str | Path, model_dir: str | Path, seed: int, *, rank: int = 4, strength: float = 2.0) -> Path:
    """BFL module names with PEFT suffixes: `diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`."""
    dims = Dims.of(model_dir)
    pairs = _Pairs(seed, rank, strength)
    sd = {}
    for module, (o, i) in dims.bfl_linears().items():
        key = f"diffusion_model.{module}"
        sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = pairs(o, i)
    return _save(sd, path)


def write_lora(fmt: str, path: str | Path, model_dir: str | Path, seed: int, **kwargs) -> Path:
    writer = {"peft": write_peft_lora, "kohya": write_kohya_lora, "xlabs": write_xlabs_lora, "bfl": write_bfl_lora}
    return writer[fmt](path, model_dir, seed, **kwargs)


def bfl_to_comfy(src: str | Path, dst: str | Path) -> Path:
    """The same LoRA in ComfyUI naming (BFL modules, kohya `lora_down/lora_up` suffixes)."""
    from safetensors.torch import load_file

    sd = load_file(str(src))
    renamed = {k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v for k, v in sd.items()}
    return _save(renamed, dst)


def write_garbage(path: str | Path) -> Path:
    """Not safetensors at all (a pickle-looking header, then noise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x80\x04\x95" + bytes(range(256)) * 4)
    return path


def write_truncated(src: str | Path, path: str | Path) -> Path:
    """A valid file cut short: the header promises more bytes than there are."""
    data = Path(src).read_bytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def write_not_a_lora(path: str | Path) -> Path:
    """A fine safetensors file whose keys are base weights, not a LoRA."""
    g = torch.Generator().manual_seed(0)
    return _save({"double_blocks.0.img_attn.qkv.weight": torch.randn(96, 32, generator=g)}, path)
