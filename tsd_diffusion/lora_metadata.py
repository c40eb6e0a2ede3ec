"""What the exported LoRA files say about themselves: safetensors header metadata that ComfyUI, A1111/Forge and
the model sites read.

Every file gets the SAI model-spec keys (``modelspec.*``, version 1.0.0, the keys kohya's sd-scripts write for an
SDXL LoRA): ``sai_model_spec``, ``architecture`` (``stable-diffusion-xl-v1-base/lora``), ``implementation``
(Stability's generative-models, as kohya writes for SDXL LoRAs), ``title``, ``resolution`` (``WxH``), ``date``
(ISO 8601), ``prediction_type`` and ``trigger_phrase`` (the instance prompt).

The training facts go in each format's own keys:

- kohya files: kohya's ``ss_*`` keys (``ss_network_module``, ``ss_base_model_version``, ``ss_sd_model_name``,
  ``ss_resolution``, ``ss_steps``, ``ss_learning_rate``, ...), with the adapter's method, trained rank and alpha
  and the dash t, s and λ learning-rate ratio in ``ss_network_args`` (JSON), where kohya keeps a network's
  arguments. ``ss_network_dim`` and ``ss_network_alpha`` are the *file's* rank and alpha (the folded rank r + s of
  a dash LoRA, scale 1), which :func:`shared.export_lora` adds itself;
- diffusers and peft files: the same facts as one JSON value, ``tsd_training`` (beside diffusers' own
  ``lora_adapter_metadata``).
"""

from __future__ import annotations

import datetime
import json
from typing import Any

MODELSPEC_VERSION = "1.0.0"
ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"
IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
#: kohya's name of an SDXL base in ``ss_base_model_version``
BASE_MODEL_VERSION = "sdxl_base_v1-0"


def training_facts(config: Any, base: str, steps: int, prediction_type: str) -> dict[str, Any]:
    """The facts of a finished run that every format records (``config`` is an ``SDXLTrainConfig``)."""
    return {"base_model": config.pretrained_model_name_or_path, "resolved_base": base, "steps": steps,
            "method": config.method, "rank": config.rank, "lora_alpha": config.lora_alpha,
            "dash_warmup_steps": config.dash_warmup_steps, "dash_directions": config.dash_directions,
            "dash_lr_ratio": config.dash_lr_ratio, "train_text_encoder": config.train_text_encoder,
            "resolution": config.resolution, "enable_bucket": config.enable_bucket,
            "learning_rate": config.learning_rate, "text_encoder_lr": config.text_encoder_lr,
            "optimizer": config.optimizer + ("8bit" if config.use_8bit_adam else ""), "use_ema": config.use_ema,
            "ema_decay": config.ema_decay if config.use_ema else None, "seed": config.seed,
            "mixed_precision": config.mixed_precision or "no", "prediction_type": prediction_type,
            "instance_prompt": config.instance_prompt}


def file_metadata(facts: dict[str, Any], title: str, file_format: str,
                  date: datetime.datetime | None = None) -> dict[str, str]:
    """The header metadata of an exported file of ``file_format`` (``diffusers``, ``kohya`` or ``peft``)."""
    date = date or datetime.datetime.now()
    res = facts["resolution"]
    meta = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": ARCHITECTURE,
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.date": date.replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "v" if facts["prediction_type"] == "v_prediction" else "epsilon",
        "modelspec.trigger_phrase": facts["instance_prompt"],
    }
    if file_format != "kohya":
        meta["tsd_training"] = json.dumps(facts, sort_keys=True)
        return meta
    network_args = {k: facts[k] for k in ("method", "rank", "lora_alpha", "dash_warmup_steps", "dash_directions",
                                          "dash_lr_ratio", "train_text_encoder", "use_ema", "ema_decay")}
    meta.update({
        "ss_network_module": "networks.lora",
        "ss_network_args": json.dumps(network_args, sort_keys=True),
        "ss_base_model_version": BASE_MODEL_VERSION,
        "ss_v2": "False",
        "ss_sd_model_name": facts["base_model"],
        "ss_resolution": f"({res}, {res})",
        "ss_steps": str(facts["steps"]),
        "ss_max_train_steps": str(facts["steps"]),
        "ss_learning_rate": str(facts["learning_rate"]),
        "ss_unet_lr": str(facts["learning_rate"]),
        "ss_text_encoder_lr": str(facts["text_encoder_lr"] if facts["train_text_encoder"] else 0.0),
        "ss_network_train_unet_only": str(not facts["train_text_encoder"]),
        "ss_optimizer": facts["optimizer"],
        "ss_mixed_precision": facts["mixed_precision"],
        "ss_seed": str(facts["seed"]),
        "ss_enable_bucket": str(facts["enable_bucket"]),
    })
    return meta
