"""The request limits every process enforces: the orchestrator checks them first, each stage
again on what it receives (a stage may be driven by something other than our orchestrator).
One table, so the two can never disagree."""

MIN_SIDE, MAX_SIDE = 64, 2048  # pixels; also a multiple of the model's size granularity
MAX_STEPS = 100
MAX_IMAGES = 8  # per request, prompts x images
MAX_PROMPTS = 8  # one encoder batch: as many as the denoiser takes
MAX_PROMPT_CHARS = 20_000
MAX_SEQUENCE_LENGTH = 512  # T5 tokens
MAX_LORA_WEIGHT = 4.0
MAX_TRUE_CFG_SCALE = 30.0  # FluxPipeline's true_cfg_scale; 1 is off
