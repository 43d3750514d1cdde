"""Write tiny random-weight FLUX models in the exact diffusers folder layout.

Nothing can be downloaded at test time, so fluxmesh makes its own models: the same folder
layout and the same classes as FLUX.1-dev / FLUX.1-schnell (`model_index.json`, CLIP-L and
T5 tokenizers and encoders, `FluxTransformer2DModel`, `AutoencoderKL`,
`FlowMatchEulerDiscreteScheduler`), just with tiny widths. Every loader in fluxmesh is then
tested on the real loading path. The output is deterministic: the same arguments write the
same bytes.

The VAE keeps four blocks so its scale factor is 8 and sizes step by 16, as with real FLUX.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

# ControlNets: tiny_controlnet.py
__all__ = [
    "ModelSize",
    "Variant",
    "write_tiny_control_lora",
    "write_tiny_depth",
    "write_tiny_model",
    "write_tiny_redux",
]


class ModelSize(str, Enum):
    tiny = "tiny"  # fractions of a second per generation: for tests
    small = "small"  # about a second per 256x256 generation on 2 cores: for benchmarks


class Variant(str, Enum):
    """Which member of the FLUX.1 family the folder is laid out as."""

    base = "base"  # FLUX.1-dev / -schnell
    fill = "fill"  # FLUX.1-Fill-dev: FluxFillPipeline, in_channels 384
    kontext = "kontext"  # FLUX.1-Kontext-dev: dev-shaped, model_index names FluxKontextPipeline
    control = "control"  # FLUX.1-Canny-dev / Depth-dev: FluxControlPipeline, in_channels doubled (128)
    redux = "redux"  # FLUX.1-Redux-dev: SigLIP + Redux image embedder (no transformer), FluxPriorReduxPipeline
    control_lora = "control-lora"  # FLUX.1-Canny-dev-lora: a Control LoRA for the base model of the same size
    # ControlNets for a base model of the same size (FluxControlNetModel folders: config.json + weights)
    controlnet = "controlnet"  # InstantX/FLUX.1-dev-Controlnet-Canny's layout
    controlnet_union = "controlnet-union"  # InstantX / Shakker-Labs ControlNet-Union: num_mode 10
    controlnet_xlabs = "controlnet-xlabs"  # XLabs-AI flux-controlnet-*-diffusers: input_hint_block on pixels
    ip_adapter = "ip-adapter"  # XLabs' ip_adapter.safetensors + a CLIP vision folder (tiny_ip_adapter.py)
    depth = "depth"  # a transformers DepthAnything depth model (serve vae --depth-model)


CONTROLNET_VARIANTS = {
    Variant.controlnet: "instantx",
    Variant.controlnet_union: "union",
    Variant.controlnet_xlabs: "xlabs",
}

_PIPELINES = {
    Variant.base: "FluxPipeline",
    Variant.fill: "FluxFillPipeline",
    Variant.kontext: "FluxKontextPipeline",
    Variant.control: "FluxControlPipeline",
}


@dataclass(frozen=True)
class _Dims:
    text_width: int  # CLIP hidden size = pooled projection dim
    t5_width: int  # T5 d_model = joint attention dim
    text_layers: int
    heads: int
    head_dim: int
    rope: tuple[int, int, int]  # sums to head_dim
    double_blocks: int
    single_blocks: int
    vae_channels: int


_DIMS = {
    ModelSize.tiny: _Dims(32, 32, 2, 2, 16, (4, 6, 6), 1, 1, 8),
    ModelSize.small: _Dims(64, 128, 2, 4, 32, (8, 12, 12), 4, 8, 32),
}

# A few hundred words of prompt-like text: enough to train both tokenizers on the fly.
_CORPUS = """
a photo of a cat sitting on a windowsill in the morning light, highly detailed, 35mm film
an astronaut riding a horse on the moon, digital art, dramatic lighting, wide angle
a red fox in the snow at dusk, national geographic, sharp focus, bokeh background
portrait of an old fisherman with a white beard, oil painting, rembrandt style
a cozy cabin in the woods during autumn, warm colors, watercolor illustration
futuristic city skyline at night with neon signs and flying cars, cyberpunk, 4k
a bowl of ramen with eggs and green onions, food photography, studio light
the quick brown fox jumps over the lazy dog while a small bird sings on the fence
mountains reflected in a calm blue lake at sunrise, landscape, ultra realistic
a robot reading a book in an ancient library, soft shadows, cinematic composition
"""


def _corpus_lines() -> list[str]:
    return [line.strip() for line in _CORPUS.strip().splitlines()] * 4


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _corpus_words() -> Counter[str]:
    return Counter(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]", " ".join(_corpus_lines()).lower()))


def _learn_bpe_merges(words: Counter[str], num_merges: int) -> list[tuple[str, str]]:
    """Learn BPE merges with CLIP's `</w>` word ending.

    Written out rather than using `tokenizers.trainers.BpeTrainer` because that trainer breaks
    ties in hash-map order, so two runs write different vocabularies; here ties go to the
    lexicographically smallest pair and the model folder is the same bytes every time.
    """
    splits = {word: tuple(word[:-1]) + (word[-1] + "</w>",) for word in words}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, symbols in splits.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += words[word]
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for word, symbols in splits.items():
            merged, i = [], 0
            while i < len(symbols):
                if symbols[i : i + 2] == best:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            splits[word] = tuple(merged)
    return merges


def _write_clip_tokenizer(folder: Path) -> int:
    """A byte-level BPE laid out as CLIP's: bytes, bytes + `</w>`, merges, then the specials."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = _learn_bpe_merges(_corpus_words(), num_merges=300)
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tokenizer.save_pretrained(folder)
    return len(tokenizer)


def _write_t5_tokenizer(folder: Path, max_length: int) -> int:
    """A SentencePiece-style unigram vocabulary as T5 uses: pieces scored by log frequency."""
    from transformers import T5Tokenizer

    words = _corpus_words()
    total = sum(words.values())
    chars = Counter(c for word, n in words.items() for c in word for _ in range(n))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, math.log(n / (total * 8))) for c, n in sorted(chars.items())]
    pieces += [("\u2581" + w, math.log(n / total)) for w, n in sorted(words.items())]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    return len(tokenizer)


def _save(module, folder: Path) -> None:
    module.save_pretrained(folder, safe_serialization=True)


def write_tiny_model(
    path: str | Path,
    *,
    schnell: bool = False,
    size: ModelSize | str = ModelSize.tiny,
    seed: int = 0,
    t5_width: int | None = None,
    fill: bool = False,
    variant: Variant | str = Variant.base,
) -> Path:
    """Write a random-weight FLUX model folder at `path` and return it.

    `schnell=True` writes a FLUX.1-schnell-style model: no guidance embedding, a fixed-shift
    scheduler and a 256-token T5 default, as the real one. `t5_width=4096` gives T5 the real
    T5-XXL width (with narrow attention and feed-forward, so it stays small): its embeddings
    are then exactly as large on the wire as FLUX.1's (512x4096).
    `fill=True` writes a FLUX.1-Fill-style model: the transformer also takes the packed masked-image
    latents and the packed pixel mask (in_channels 64 + 64 + 4 * 8 * 8 = 384, out_channels 64, as
    FLUX.1-Fill-dev) and model_index.json names `FluxFillPipeline` (the same as `variant="fill"`).
    `variant` (see `Variant`): kontext and control write those models' folders; redux writes a
    FLUX.1-Redux folder whose image embedder fits this size's T5 width (`write_tiny_redux`);
    ip-adapter an XLabs IP-Adapter file and its CLIP vision folder, likewise (tiny_ip_adapter.py).
    """
    variant = Variant.fill if fill else Variant(variant)
    if variant == Variant.redux:
        return write_tiny_redux(path, size=size, seed=seed, t5_width=t5_width)
    if variant == Variant.control_lora:
        return write_tiny_control_lora(path, size=size, seed=seed).parent
    if variant in CONTROLNET_VARIANTS:
        from fluxmesh.services.tools.tiny_controlnet import write_tiny_controlnet

        layout = CONTROLNET_VARIANTS[variant]
        return write_tiny_controlnet(path, layout, size=size, seed=seed, schnell=schnell, t5_width=t5_width)
    if variant == Variant.ip_adapter:
        from fluxmesh.services.tools.tiny_ip_adapter import write_tiny_ip_adapter

        return write_tiny_ip_adapter(path, size=ModelSize(size).value, seed=seed, t5_width=t5_width)
    if variant == Variant.depth:
        return write_tiny_depth(path, seed=seed)
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    size = ModelSize(size)
    dims = _DIMS[size]
    t5_d_model = t5_width or dims.t5_width
    t5_d_kv = 8 if t5_width else dims.t5_width // dims.heads
    t5_d_ff = 16 if t5_width else dims.t5_width * 2
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    max_sequence_length = 256 if schnell else 512

    clip_vocab = _write_clip_tokenizer(root / "tokenizer")
    t5_vocab = _write_t5_tokenizer(root / "tokenizer_2", max_sequence_length)

    torch.manual_seed(seed)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=clip_vocab,
            hidden_size=dims.text_width,
            intermediate_size=dims.text_width * 2,
            num_hidden_layers=dims.text_layers,
            num_attention_heads=dims.heads,
            max_position_embeddings=77,
            projection_dim=dims.text_width,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_act="quick_gelu",
        )
    )
    _save(clip, root / "text_encoder")

    t5 = T5EncoderModel(
        T5Config(
            vocab_size=t5_vocab,
            d_model=t5_d_model,
            d_kv=t5_d_kv,
            d_ff=t5_d_ff,
            num_layers=dims.text_layers,
            num_heads=dims.heads,
            feed_forward_proj="gated-gelu",
            dense_act_fn="gelu_new",
            is_gated_act=True,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            tie_word_embeddings=False,
        )
    )
    _save(t5, root / "text_encoder_2")

    # FluxFillPipeline feeds cat(latents, masked-image latents, mask) along the packed channels:
    # 4 * 16 latent channels twice, plus the 8x8 pixel mask of each latent pixel, 2x2-packed.
    vae_scale = 8
    packed = 4 * 16
    # FluxControlPipeline: cat(latents, control-image latents) along the packed channels (128).
    in_channels = {Variant.fill: packed * 2 + 4 * vae_scale * vae_scale, Variant.control: packed * 2}.get(
        variant, packed
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        out_channels=packed if in_channels != packed else None,  # None: same as in_channels
        num_layers=dims.double_blocks,
        num_single_layers=dims.single_blocks,
        attention_head_dim=dims.head_dim,
        num_attention_heads=dims.heads,
        joint_attention_dim=t5_d_model,
        pooled_projection_dim=dims.text_width,
        guidance_embeds=not schnell,
        axes_dims_rope=dims.rope,
    )
    _save(transformer, root / "transformer")

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(dims.vae_channels,) * 4,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )
    _save(vae, root / "vae")

    if schnell:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    scheduler.save_pretrained(root / "scheduler")

    _write_json(
        root / "model_index.json",
        {
            "_class_name": _PIPELINES[variant],
            "_diffusers_version": _diffusers_version(),
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "FluxTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
    return root


def vision_tower(size: ModelSize | str) -> dict[str, int]:
    """The widths of a tiny vision encoder (Redux's SigLIP, the IP-Adapter's CLIP) at this size:
    patch 8, so 16 or 64 image tokens (real SigLIP: 729)."""
    dims = _DIMS[ModelSize(size)]
    return {
        "hidden_size": dims.text_width,
        "intermediate_size": dims.text_width * 2,
        "num_hidden_layers": dims.text_layers,
        "num_attention_heads": dims.heads,
        "image_size": 32 if ModelSize(size) == ModelSize.tiny else 64,
        "patch_size": 8,
    }


def write_tiny_redux(
    path: str | Path, *, size: ModelSize | str = ModelSize.tiny, seed: int = 0, t5_width: int | None = None
) -> Path:
    """A FLUX.1-Redux folder as black-forest-labs/FLUX.1-Redux-dev lays it out: `image_encoder/`
    (SiglipVisionModel), `feature_extractor/` (SiglipImageProcessor), `image_embedder/`
    (ReduxImageEncoder: SigLIP width -> 3 x T5 width -> T5 width) and a model_index.json naming
    FluxPriorReduxPipeline. The embedder's output width is the T5 width of `write_tiny_model`'s
    model of the same size (or `t5_width`), so the two go together."""
    import torch
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    dims = _DIMS[ModelSize(size)]
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tower = vision_tower(size)
    image_size = tower["image_size"]
    torch.manual_seed(seed)
    vision = SiglipVisionModel(SiglipVisionConfig(**tower))
    _save(vision, root / "image_encoder")
    # The real processor: bicubic resize to the encoder's size, [-1, 1] (mean = std = 0.5).
    SiglipImageProcessor(
        size={"height": image_size, "width": image_size}, resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(root / "feature_extractor")
    embedder = ReduxImageEncoder(redux_dim=dims.text_width, txt_in_features=t5_width or dims.t5_width)
    _save(embedder, root / "image_embedder")
    _write_json(
        root / "model_index.json",
        {
            "_class_name": "FluxPriorReduxPipeline",
            "_diffusers_version": _diffusers_version(),
            "feature_extractor": ["transformers", "SiglipImageProcessor"],
            "image_embedder": ["flux", "ReduxImageEncoder"],
            "image_encoder": ["transformers", "SiglipVisionModel"],
        },
    )
    return root


CONTROL_LORA_FILE = "flux1-canny-dev-lora.safetensors"  # the file name in black-forest-labs/FLUX.1-Canny-dev-lora


def write_tiny_control_lora(path: str | Path, *, size: ModelSize | str = ModelSize.tiny, seed: int = 0) -> Path:
    """A FLUX.1 Control LoRA for the base model `write_tiny_model` writes at this size, written to
    `path/flux1-canny-dev-lora.safetensors` and returned: LoRA pairs on `x_embedder` taking twice
    the packed channels (latents + control-image latents, 128) and on every attention projection,
    plus the q/k norm scales a Control LoRA carries. The keys are diffusers' (`transformer.` + the
    module, as FluxControlPipeline.save_lora_weights and diffusers' Control LoRA trainer write
    them): BFL's own files use BFL's names, which diffusers converts only at FLUX.1's full widths
    (19 + 38 blocks of 3072), so a tiny one cannot take them."""
    import torch
    from safetensors.torch import save_file

    dims = _DIMS[ModelSize(size)]
    inner, rank, packed = dims.heads * dims.head_dim, 4, 4 * 16
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}

    def pair(module: str, in_features: int, out_features: int) -> None:
        tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.3
        tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.3

    def norms(block: str, names: tuple[str, ...]) -> None:
        for name in names:
            scale = 1 + 0.1 * torch.randn(dims.head_dim, generator=generator)
            tensors[f"transformer.{block}.attn.{name}.weight"] = scale

    pair("x_embedder", 2 * packed, inner)
    for i in range(dims.double_blocks):
        block = f"transformer_blocks.{i}"
        for module in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            pair(f"{block}.attn.{module}", inner, inner)
        norms(block, ("norm_q", "norm_k", "norm_added_q", "norm_added_k"))
    for i in range(dims.single_blocks):
        block = f"single_transformer_blocks.{i}"
        for module in ("to_q", "to_k", "to_v"):
            pair(f"{block}.attn.{module}", inner, inner)
        norms(block, ("norm_q", "norm_k"))
    pair("proj_out", inner, packed)
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, root / CONTROL_LORA_FILE, metadata={"format": "pt"})
    return root / CONTROL_LORA_FILE


def write_tiny_depth(path: str | Path, *, seed: int = 0) -> Path:
    """A Depth Anything model as LiheYoung/depth-anything-*-hf and depth-anything/Depth-Anything-V2-*-hf
    lay it out (config.json, model.safetensors, preprocessor_config.json: DepthAnythingForDepthEstimation
    on a DINOv2 backbone, DPTImageProcessor keeping the aspect at a multiple of 14), with a 4-layer
    32-wide backbone and a 70-pixel input instead of 518."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    backbone = Dinov2Config(
        image_size=70,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        out_indices=[1, 2, 3, 4],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
    )
    _save(DepthAnythingForDepthEstimation(config), root)
    DPTImageProcessor(
        do_resize=True,
        size={"height": 70, "width": 70},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(root)
    return root


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
