"""Diffusion frontend: LoRA-Dash / TSD adapters for diffusers pipelines (SDXL DreamBooth)."""
