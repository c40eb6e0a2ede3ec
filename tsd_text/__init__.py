"""Text frontend: LoRA-Dash / TSD adapters for transformers language models.

- ``data``: input formats (BIG-bench task JSON, LLM-Adapters JSON, CSV/TSV/JSONL), detection, validation;
- ``causal``: causal-LM multiple choice (answer-only LM loss, cached length-normalised choice scoring);
- ``classification``: sequence classification/regression (labels, head, GLUE metrics);
- ``train``: the accelerate training loop behind ``apps/train_text.py``;
- ``tiny``: tiny models and toy tasks built locally, for tests and the benchmark.
"""
