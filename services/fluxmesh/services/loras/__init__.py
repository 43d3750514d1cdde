"""LoRAs for the FLUX stages: a directory of community LoRA files, switched per request.

    library = LoraLibrary("/loras", max_cached=8, components=("transformer",))   # denoiser
    activator = LoraActivator(transformer, library)
    loras = library.check(request_loras, field="loras")        # up-front validation, cheap
    activator.activate(loras)      # [("style/ink", 0.8), ("detail", 0.5)]; then denoise
    activator.activate([])         # base model, bit for bit

The encoder does the same with `components=("text_encoder",)` and its CLIP text encoder.
Activation and the inference after it must not interleave with another request's on the same
model (the adapters live in the model).
"""

from fluxmesh.contract import check_lora_weight

from .activation import LoraActivator
from .library import LoraLibrary, LoraWeights

__all__ = ["LoraActivator", "LoraLibrary", "LoraWeights", "check_lora_weight"]
