"""`fluxmesh plan`: how much accelerator memory each stage needs, and which placements fit.

Computed from the model at hand, nothing looked up in a table:

* **Weights** from the files' headers, no tensor data read: safetensors headers give every
  tensor's shape (bytes = values x the dtype the stage loads them in, with transformers'
  `_keep_in_fp32_modules` rule for float16 and tied weights counted once); a GGUF transformer's
  tensor infos give the stored bytes of quantized tensors (kept quantized when loaded) and the
  values of float ones (loaded in the compute dtype); a GGUF T5 is dequantized when loaded
  (fluxmesh.services.gguf.loading), so it counts like safetensors. These match what the stages
  report in Info.weight_bytes (tests/test_plan.py checks it on tiny models).
* **Activations** from the resolution and the configs, by counting the largest tensors alive at
  the peak of each stage's forward pass (derivations inline). They assume CUDA's
  memory-efficient attention for the transformer (no sequence x sequence matrix) and a
  materialized attention matrix in T5 and in the VAE's mid-block (T5's eager attention does;
  the VAE's single 512-wide head is beyond flash attention's head size), so they err high.
* **Per-process overhead**: every stage process that touches CUDA holds a context (kernels,
  cuBLAS workspace) outside torch's allocator: `context_bytes`, 0.5 GiB by default (typically
  0.3-0.6 GiB depending on GPU, driver and CUDA version; `nvidia-smi` shows it per process).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fluxmesh import contract
from fluxmesh.contract import LIMITS, Limits
from fluxmesh.rpc.errors import InvalidArgument, NotFound
from fluxmesh.services.runtime import model_folder

__all__ = ["Layout", "Plan", "StageNeed", "make_plan", "parse_size"]

GIB = 2**30
CONTEXT_BYTES = GIB // 2
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_SAFETENSORS_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
# Tried from the most precise down when the transformer does not fit as it is.
_SUGGESTED_QUANTS = ("Q8_0", "Q6_K", "Q5_K", "Q4_K")


def parse_size(text: str, field_name: str = "vram") -> int:
    """ "16GiB", "16 GB" (read as GiB: cards are sold in binary sizes), "12.5G", "800MiB" -> bytes."""
    units = {
        "": GIB,
        "g": GIB,
        "gb": GIB,
        "gib": GIB,
        "m": 2**20,
        "mb": 2**20,
        "mib": 2**20,
        "t": 2**40,
        "tb": 2**40,
        "tib": 2**40,
    }
    value = text.strip().lower()
    number = value.rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = value[len(number) :].strip()
    try:
        amount = float(number)
    except ValueError:
        amount = math.nan
    if unit not in units or not math.isfinite(amount) or amount <= 0:
        raise InvalidArgument(field_name, f"{text!r}: expected a size like 16GiB, 24GB or 800MiB")
    return int(amount * units[unit])


@dataclass(frozen=True)
class StageNeed:
    stage: str
    weight_bytes: int
    activation_bytes: int
    sources: tuple[str, ...]  # where the weights come from, for people

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes


@dataclass(frozen=True)
class Layout:
    """One way to place the stages, and what it asks of the accelerator."""

    name: str
    accelerator_bytes: int  # on the busiest accelerator
    fits: bool
    note: str = ""
    cpu_bytes: int = 0  # weights + activations placed in CPU memory instead


@dataclass
class Plan:
    model: str
    width: int
    height: int
    num_images: int
    dtype: str
    vram_bytes: int
    context_bytes: int
    stages: list[StageNeed]
    layouts: list[Layout] = field(default_factory=list)
    quantization: list[Layout] = field(default_factory=list)  # sequential mode with a quantized transformer
    steps: int = 28
    true_cfg: bool = False
    work: float = 0.0  # megapixel-steps (fluxmesh.contract.request_work)
    refusal: str = ""  # why an orchestrator with these limits refuses such a request; "" = admissible

    def to_dict(self) -> dict:
        data = asdict(self)
        for stage, need in zip(data["stages"], self.stages):
            stage["total_bytes"] = need.total_bytes
        return data

    def describe(self) -> str:
        gib = _size
        lines = [
            f"{self.model}: {self.width}x{self.height}, {self.num_images} image(s), {self.dtype}, "
            f"for an accelerator of {gib(self.vram_bytes)}",
            f"{'stage':9s} {'weights':>10s} {'activations':>12s} {'total':>10s}  weights from",
        ]
        for s in self.stages:
            lines.append(
                f"{s.stage:9s} {gib(s.weight_bytes):>10s} {gib(s.activation_bytes):>12s} "
                f"{gib(s.total_bytes):>10s}  {'; '.join(s.sources)}"
            )
        lines.append(f"plus {gib(self.context_bytes)} CUDA context per stage process on the accelerator")
        lines.append(
            f"{self.steps} steps{' with true CFG' if self.true_cfg else ''}: {self.work:g} megapixel-steps; "
            + (
                f"REFUSED by the orchestrator's limits: {self.refusal}"
                if self.refusal
                else "admissible under the orchestrator's limits"
            )
        )
        lines.append("")
        lines.append(f"{'placement':52s} {'accelerator':>12s}  fits")
        for layout in self.layouts + self.quantization:
            lines.append(
                f"{layout.name:52s} {gib(layout.accelerator_bytes):>12s}  {'yes' if layout.fits else 'no'}"
                + (f"  ({layout.note})" if layout.note else "")
            )
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


# --------------------------------------------------------------------------- weights


def _safetensors_files(folder: Path) -> list[Path]:
    if folder.is_file():  # one file, as XLabs' ip_adapter.safetensors
        return [folder]
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:  # sharded: the index names the shards (a folder may hold other variants too)
        return [folder / name for name in sorted(set(json.loads(index[0].read_text())["weight_map"].values()))]
    files = sorted(p for p in folder.glob("*.safetensors") if ".fp16." not in p.name)
    if not files:
        raise NotFound(f"{folder}: no .safetensors weights")
    return files


def _tensor_shapes(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape) of every tensor in a component folder, headers only."""
    from safetensors import safe_open

    shapes = {}
    for file in _safetensors_files(folder):
        with safe_open(str(file), framework="numpy") as handle:
            for key in handle.keys():
                part = handle.get_slice(key)
                shapes[key] = (part.get_dtype(), tuple(part.get_shape()))
    return shapes


def _loaded_bytes(folder: Path, dtype: str, model_class=None) -> int:
    """Bytes a component holds once loaded with torch_dtype=`dtype` (floats cast, others as stored)."""
    keep_fp32, tied = set(), {}
    if model_class is not None:
        keep_fp32 = set(getattr(model_class, "_keep_in_fp32_modules_strict", None) or [])
        if dtype == "float16":  # transformers upcasts these only for fp16 (fp16 overflows in T5's wo)
            keep_fp32 |= set(getattr(model_class, "_keep_in_fp32_modules", None) or [])
        tied = getattr(model_class, "_tied_weights_keys", None) or {}
        tied = tied if isinstance(tied, dict) else {}
    shapes = _tensor_shapes(folder)
    total = 0
    for key, (stored, shape) in shapes.items():
        if tied.get(key) in shapes:
            continue  # a tied copy is one tensor in memory
        if stored in ("F64", "F32", "F16", "BF16"):
            size = 4 if keep_fp32 & set(key.split(".")) else _DTYPE_BYTES[dtype]
        else:
            size = _SAFETENSORS_BYTES.get(stored, 4)
        total += math.prod(shape) * size
    return total


def _gguf_transformer_bytes(path: Path, folder: Path, dtype: str) -> int:
    """Quantized tensors stay as stored; float tensors are loaded in the compute dtype. A file
    the denoiser would refuse for this model folder is refused here too, for the same reason."""
    from gguf import GGMLQuantizationType as G

    from fluxmesh.services.gguf.loading import check_transformer_fits

    reader = check_transformer_fits(path, folder)
    floats = (G.F32, G.F16, G.BF16)
    return sum(
        int(t.n_elements) * _DTYPE_BYTES[dtype] if t.tensor_type in floats else int(t.n_bytes) for t in reader.tensors
    )


def _gguf_t5_bytes(path: Path, folder: Path, dtype: str) -> int:
    """transformers dequantizes a T5 GGUF to the dtype as it loads it (a file the encoder would
    refuse for this model folder is refused here too)."""
    from fluxmesh.services.gguf.loading import check_t5_fits

    _, _, reader = check_t5_fits(path, folder)
    return sum(int(t.n_elements) for t in reader.tensors) * _DTYPE_BYTES[dtype]


# --------------------------------------------------------------------------- activations


def _encoder_activations(folder: Path, length: int, b: int) -> int:
    """T5 dominates (CLIP runs 77 tokens). Its eager attention keeps, per layer, the position
    bias (shared by all layers), scores, scores + bias, a float32 softmax and its cast back:
    (4b + 4) * heads * L^2. The gated-GELU feed-forward holds wi_0, its GELU, wi_1 and their
    product: 4 * L * d_ff * b. Layer norms run in float32 on L * d_model values (x 4 alive)."""
    t5 = model_folder.read_config(folder, "text_encoder_2")
    clip = model_folder.read_config(folder, "text_encoder")
    heads, d_model, d_ff = t5["num_heads"], t5["d_model"], t5["d_ff"]
    attention = (4 * b + 4) * heads * length * length
    feed_forward = 4 * length * d_ff * b
    norms = 4 * length * d_model * 4
    tokens = clip.get("max_position_embeddings", 77)
    clip_peak = (4 * b + 4) * clip["num_attention_heads"] * tokens**2 + 4 * tokens * clip["intermediate_size"] * b
    return max(attention + feed_forward + norms, clip_peak)


def _denoiser_activations(
    folder: Path, width: int, height: int, length: int, images: int, b: int, gguf_transformer: bool
) -> int:
    """A single-stream block at its peak (cat + proj_out) holds, in units of batch x tokens x
    inner_dim: the block input (kept for the residual) 1, the modulated norm 1, the MLP branch
    after GELU 4, attention output 1, their concatenation 5, proj_out's output 1 = 13. Tokens are
    the T5 length plus one per 2x2 latent patch. Double-stream blocks hold less (each stream's MLP
    is 4x its own tokens only). A GGUF linear dequantizes its weight per call: the largest one,
    once in float32 and once in the compute dtype."""
    config = model_folder.read_config(folder, "transformer")
    patch = 2 * model_folder.vae_scale_factor(folder)
    tokens = length + (width // patch) * (height // patch)
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    peak = 13 * images * tokens * inner * b
    if gguf_transformer:
        peak += inner * 5 * inner * (4 + b)  # single blocks' proj_out: inner x (inner + 4 * inner)
    latents = 3 * images * tokens * config.get("in_channels", 64) * 4  # latents, noise, model output (fp32)
    return peak + latents


def _vae_activations(folder: Path, width: int, height: int, images: int, b: int) -> int:
    """Walk the decoder: conv_in and the mid-block at latent size, then each up block's resnets
    (input kept for the residual, a norm/SiLU temporary, two conv outputs: 2*c_in + 2*c_out values
    per pixel) and its 2x upsample (input, nearest-upsampled copy, conv output: 9*c per input
    pixel). The mid-block's one-head attention adds its (h*w)^2 score matrix."""
    config = model_folder.read_config(folder, "vae")
    channels = list(reversed(config["block_out_channels"]))
    layers = config.get("layers_per_block", 2) + 1
    scale = model_folder.vae_scale_factor(folder)
    h, w = height // scale, width // scale
    peak = (h * w) ** 2 + 6 * channels[0] * h * w  # mid-block attention: scores, q, k, v, out, input
    c_in = channels[0]
    for i, c_out in enumerate(channels):
        for j in range(layers):
            peak = max(peak, (2 * (c_in if j == 0 else c_out) + 2 * c_out) * h * w)
        c_in = c_out
        if i < len(channels) - 1:
            peak = max(peak, 9 * c_out * h * w)
            h, w = h * 2, w * 2
    image = 3 * height * width * 4  # the decoded image, float32 for post-processing
    # Images are decoded one at a time (vae/engine.py): one image's activations, every image's pixels.
    return peak * b + image + images * 3 * height * width


# --------------------------------------------------------------------------- the plan


def make_plan(
    model: str | Path,
    *,
    vram: int,
    width: int = 1024,
    height: int = 1024,
    num_images: int = 1,
    dtype: str = "bfloat16",
    transformer_gguf: str | Path | None = None,
    t5_gguf: str | Path | None = None,
    max_sequence_length: int | None = None,
    context_bytes: int = CONTEXT_BYTES,
    redux: str | Path | None = None,
    controlnets: Sequence[str | Path] = (),
    ip_adapter: str | Path | None = None,
    ip_adapter_image_encoder: str | Path | None = None,
    steps: int | None = None,
    true_cfg: bool = False,
    limits: Limits = LIMITS,
) -> Plan:
    """`redux`: a FLUX.1-Redux folder the encoder loads too (--redux); its image tokens lengthen
    the denoiser's text sequence. A Kontext model's denoiser also attends to its reference's
    tokens (counted at Kontext's largest preferred resolution). `controlnets`: FluxControlNetModel
    folders the denoiser holds beside the transformer (--controlnet), counted in its weights.
    `ip_adapter` (the denoiser's --ip-adapter file) and `ip_adapter_image_encoder` (the encoder's
    CLIP vision folder) add their weights to those stages; the adapter's 4 image tokens are
    attended to apart, a rounding error.

    `steps` (default: the orchestrator's for the model), `true_cfg` and `limits` decide only
    whether the orchestrator would admit such a request (`Plan.refusal`), by the contract's own
    check; the memory figures stand either way."""
    folder = Path(model)
    if not (folder / "model_index.json").is_file():
        raise NotFound(f"{folder}: not a diffusers model folder (no model_index.json); plan reads local files")
    if dtype not in _DTYPE_BYTES:
        raise InvalidArgument("dtype", f"{dtype!r}; expected one of {', '.join(_DTYPE_BYTES)}")
    multiple = 2 * model_folder.vae_scale_factor(folder)
    contract.check_size(width, height, multiple)  # a plan for a request the stages would take
    contract.check_num_images(num_images)
    from transformers import CLIPTextModel, T5EncoderModel

    b = _DTYPE_BYTES[dtype]
    length = max_sequence_length or model_folder.default_max_sequence_length(folder)

    clip_config = model_folder.read_config(folder, "text_encoder")
    # + CLIP's position_ids: an int64 buffer the model makes itself, not stored in the file.
    clip = _loaded_bytes(folder / "text_encoder", dtype, CLIPTextModel) + 8 * clip_config["max_position_embeddings"]
    if t5_gguf:
        t5, t5_from = (
            _gguf_t5_bytes(Path(t5_gguf), folder, dtype),
            f"T5 {Path(t5_gguf).name} (GGUF, dequantized to {dtype})",
        )
    else:
        t5, t5_from = _loaded_bytes(folder / "text_encoder_2", dtype, T5EncoderModel), f"T5 safetensors as {dtype}"
    encoder_from = [f"CLIP safetensors as {dtype}", t5_from]
    extra_tokens = redux_weights = 0  # extra tokens: beside T5's and the output's, in the denoiser
    if redux:
        redux_weights, redux_tokens = _redux_needs(Path(redux), dtype)
        extra_tokens += redux_tokens
        encoder_from.append(f"Redux SigLIP + image embedder as {dtype}")
    ip_encoder, ip_denoiser = _ip_adapter_needs(ip_adapter, ip_adapter_image_encoder, dtype)
    if ip_encoder:
        encoder_from.append(f"IP-Adapter CLIP vision model as {dtype}")
    if model_folder.read_index(folder).get("_class_name", "").startswith("FluxKontext"):
        extra_tokens += _kontext_reference_tokens(folder)
    if transformer_gguf:
        transformer = _gguf_transformer_bytes(Path(transformer_gguf), folder, dtype)
        transformer_from = f"{Path(transformer_gguf).name} (GGUF, kept quantized)"
    else:
        transformer = _loaded_bytes(folder / "transformer", dtype)
        transformer_from = f"transformer safetensors as {dtype}"
    denoiser_from = [transformer_from]
    for controlnet in map(Path, controlnets):
        if not (controlnet / "config.json").is_file():
            raise NotFound(f"{controlnet}: not a FluxControlNetModel folder (no config.json)")
        transformer += _loaded_bytes(controlnet, dtype)
        denoiser_from.append(f"ControlNet {controlnet.name} safetensors as {dtype}")
    if ip_denoiser:
        denoiser_from.append(f"IP-Adapter {Path(ip_adapter).name} as {dtype}")
    stages = [
        StageNeed(
            "encoder",
            clip + t5 + redux_weights + ip_encoder,
            _encoder_activations(folder, length, b),
            tuple(encoder_from),
        ),
        StageNeed(
            "denoiser",
            transformer + ip_denoiser,
            _denoiser_activations(folder, width, height, length + extra_tokens, num_images, b, bool(transformer_gguf)),
            tuple(denoiser_from),
        ),
        StageNeed(
            "vae",
            _loaded_bytes(folder / "vae", dtype),
            _vae_activations(folder, width, height, num_images, b),
            (f"VAE safetensors as {dtype}",),
        ),
    ]
    plan = Plan(str(folder), width, height, num_images, dtype, vram, context_bytes, stages)
    plan.steps = steps or _default_steps(folder)
    plan.true_cfg = true_cfg
    plan.work = contract.request_work(width, height, num_images, plan.steps, true_cfg)
    try:
        contract.check_steps(plan.steps, limits)
        contract.check_admissible(width, height, num_images, plan.steps, true_cfg, multiple, limits)
    except InvalidArgument as refusal:
        plan.refusal = refusal.message
    plan.layouts = _layouts(stages, vram, context_bytes)
    largest = max(stages, key=lambda s: s.total_bytes).stage
    if not any(layout.fits for layout in plan.layouts[:2]) and largest == "denoiser" and not transformer_gguf:
        plan.quantization = _quantized(folder, stages, vram, context_bytes, dtype, width, height, length, num_images)
    return plan


def _redux_needs(folder: Path, dtype: str) -> tuple[int, int]:
    """A Redux folder's loaded bytes (SigLIP vision model + image embedder) and its image tokens."""
    from transformers import SiglipVisionModel

    if not (folder / "image_embedder").is_dir():
        raise NotFound(f"{folder}: not a FLUX.1-Redux folder (no image_embedder/)")
    vision = model_folder.read_config(folder, "image_encoder")
    weights = _loaded_bytes(folder / "image_encoder", dtype, SiglipVisionModel) + _loaded_bytes(
        folder / "image_embedder", dtype
    )
    # + SigLIP's position_ids: an int64 buffer the model makes itself, not stored in the file.
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    return weights + 8 * tokens, tokens


def _ip_adapter_needs(ip_adapter: str | Path | None, image_encoder: str | Path | None, dtype: str) -> tuple[int, int]:
    """(the encoder's CLIP vision model, the denoiser's adapter) in bytes once loaded; 0 where not given."""
    encoder = denoiser = 0
    if ip_adapter:
        if not Path(ip_adapter).is_file():
            raise NotFound(f"{ip_adapter}: no such IP-Adapter file")
        denoiser = _loaded_bytes(Path(ip_adapter), dtype)
    if image_encoder:
        folder = Path(image_encoder)
        if not (folder / "config.json").is_file():
            raise NotFound(f"{folder}: not a CLIP vision model folder (no config.json)")
        # openai/clip-vit-large-patch14 holds the text tower too: only the vision parts are loaded
        for key, (stored, shape) in _tensor_shapes(folder).items():
            if key.startswith(("vision_model.", "visual_projection.")):
                total = math.prod(shape)
                encoder += total * (_DTYPE_BYTES[dtype] if stored in ("F64", "F32", "F16", "BF16") else 8)
        config = json.loads((folder / "config.json").read_text())
        vision = config.get("vision_config", config)  # a whole CLIPModel's config nests it
        # + the position_ids the model makes itself (int64, one per patch and the class token), not stored
        encoder += 8 * ((vision["image_size"] // vision["patch_size"]) ** 2 + 1)
    return encoder, denoiser


def _kontext_reference_tokens(folder: Path) -> int:
    """The most tokens a snapped Kontext reference brings (one per 2x2 latent patch)."""
    patch = 2 * model_folder.vae_scale_factor(folder)
    return max((w // patch) * (h // patch) for w, h in contract.PREFERRED_KONTEXT_RESOLUTIONS)


def _default_steps(folder: Path) -> int:
    from fluxmesh.orchestrator.request import DEFAULT_STEPS_DEV, DEFAULT_STEPS_SCHNELL

    return (
        DEFAULT_STEPS_DEV
        if model_folder.read_config(folder, "transformer").get("guidance_embeds")
        else DEFAULT_STEPS_SCHNELL
    )


def _layouts(stages: list[StageNeed], vram: int, context: int) -> list[Layout]:
    by = {s.stage: s for s in stages}
    weights = sum(s.weight_bytes for s in stages)
    resident = weights + sum(s.activation_bytes for s in stages) + 3 * context
    sequential = max(s.total_bytes for s in stages) + 3 * context
    cpu_encoder = by["denoiser"].total_bytes + by["vae"].total_bytes + 2 * context
    per_stage = max(s.total_bytes for s in stages) + context
    return [
        Layout(
            "all stages resident on one accelerator",
            resident,
            resident <= vram,
            "stages may compute at once: every stage's activations counted",
        ),
        Layout(
            "sequential on one accelerator (--sequential)",
            sequential,
            sequential <= vram,
            f"largest stage: {max(stages, key=lambda s: s.total_bytes).stage}",
        ),
        Layout(
            "encoder on CPU, denoiser + vae resident on one",
            cpu_encoder,
            cpu_encoder <= vram,
            "",
            cpu_bytes=by["encoder"].total_bytes,
        ),
        Layout("one accelerator per stage", per_stage, per_stage <= vram, "the largest stage's card"),
    ]


def _quantized(
    folder: Path,
    stages: list[StageNeed],
    vram: int,
    context: int,
    dtype: str,
    width: int,
    height: int,
    length: int,
    images: int,
) -> list[Layout]:
    """Sequential mode with the transformer as a GGUF of each type, most precise first, down to
    the first that fits (sizes from fluxmesh's own quantizer's rules, from the headers)."""
    from fluxmesh.services.gguf import transformer_gguf_size

    try:
        _safetensors_files(folder / "transformer")
    except NotFound:
        return []  # only a GGUF at hand: nothing to requantize from
    by = {s.stage: s for s in stages}
    options = []
    for qtype in _SUGGESTED_QUANTS:
        quantized, floats = transformer_gguf_size(folder, qtype)
        weights = quantized + floats * _DTYPE_BYTES[dtype]
        denoiser = weights + _denoiser_activations(folder, width, height, length, images, _DTYPE_BYTES[dtype], True)
        need = max(denoiser, by["encoder"].total_bytes, by["vae"].total_bytes) + 3 * context
        options.append(
            Layout(
                f"sequential, transformer as {qtype} GGUF",
                need,
                need <= vram,
                f"transformer {_size(weights)}: fluxmesh quantize {folder} flux-{qtype}.gguf "
                f"--type {qtype}, then --transformer-gguf flux-{qtype}.gguf",
            )
        )
        if need <= vram:
            break
    return options
