"""The GPU stage services: text encoder, denoiser and VAE (torch, diffusers, transformers)."""
