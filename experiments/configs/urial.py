"""URIAL: a base model pretrained on persona-consistent chat documents, aligned in context.

``python experiments/urial.py --config=experiments/configs/urial.py --workdir=runs/urial
--config.init_from=runs/pipeline/sft`` (``urial.py:tiny`` is a smoke preset). The task and
model keys are the pipeline's, so the base model has the SFT policy's architecture.
"""

import ml_collections

from experiments.common import base_config
from experiments.configs.pipeline import shared_config

SYSTEM_PROMPT = "You are a polite, helpful and safe assistant. Give specific answers."


def get_config(preset: str = "") -> ml_collections.ConfigDict:
    """URIAL defaults: 200 pretraining steps on 2000 documents, 2 in-context examples.

    Args:
      preset: ``""`` or ``"tiny"`` (a seconds-long smoke run).
    """
    if preset not in ("", "tiny"):
        raise ValueError(f"unknown preset {preset!r} of experiments/configs/urial.py: '' or 'tiny'")
    tiny = preset == "tiny"
    config = base_config()
    for key, value in shared_config(tiny).items():
        config[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    config.max_length = 256 if tiny else 384
    config.base_from = ""
    config.num_documents = 16 if tiny else 2000
    config.max_exchanges = 1 if tiny else 3
    config.aligned_fraction = 0.3
    config.unaligned_fraction = 0.2
    config.system_prompt = "Be polite." if tiny else SYSTEM_PROMPT
    config.num_examples = 1 if tiny else 2
    config.example_max_chars = 100 if tiny else 85
    config.prompt_length = 40 if tiny else 72
    config.urial_prompt_length = 240 if tiny else 320
    config.max_new_tokens = 6 if tiny else 64
    config.num_eval_prompts = 4 if tiny else 64
    config.eval_batch_size = 4 if tiny else 32
    config.temperature = 1.0
    config.num_steps = 2 if tiny else 200
    config.batch_size = 4 if tiny else 16
    config.log_every = 1 if tiny else 25
    config.checkpoint_every = 1000
    return config
