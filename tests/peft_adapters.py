"""Real PEFT adapters for tests, shared by the test packages (tests/ is on sys.path: pytest
puts each package's root folder there)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def make_adapter(base: Path, folder: Path, seed: int, b_std: float, **lora_kwargs: Any) -> Path:
    """A real PEFT adapter on the HF folder ``base``, saved with ``save_pretrained``, whose
    lora_B is random (PEFT starts it at zero); ``lora_kwargs`` go to ``LoraConfig``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, b_std)
    peft_model.save_pretrained(folder)
    return folder
