"""tsd-lora adapter core: LoRA-Dash, LoRA-Init, LoRA-TSD, EVA, LoRA-DA and peft baselines on one peft core.

Imports only torch, peft and safetensors; transformers, diffusers and matplotlib are imported lazily
where a function needs them.
"""

from . import tsd
from .adapter import Adapter, attach
from .config import AdapterConfig
from .export import FORMATS, export_lora
from .methods import METHODS
from .native import load

__all__ = ["METHODS", "FORMATS", "AdapterConfig", "Adapter", "attach", "export_lora", "load", "tsd"]
__version__ = "0.1.0"
