"""Text frontend: LoRA-Dash / TSD adapters for transformers language models."""
