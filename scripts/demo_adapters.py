"""Write small untrained PEFT LoRA adapters for the default model (benchmarks/serve_load.py
uses them; ``make demo`` serves the trained ones in examples/adapters instead).

They are untrained: PEFT's initialisation with a small random lora_B, so each one shifts the
model's answers a little while keeping them readable. Trained adapters come from
``loraplex finetune`` (scripts/train_demo_adapters.py). Existing folders are kept.

    python scripts/demo_adapters.py OUT_DIR [--names demo-a demo-b]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(base: Path, out: Path, seed: int, rank: int = 8, scale: float = 0.02) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank,
                                                  target_modules=TARGETS, lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts lora_B at zero: the adapter would do nothing
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--names", nargs="+", default=["demo-a", "demo-b"])
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()

    from loraplex.models.registry import resolve_model

    base = resolve_model(args.model)
    for seed, name in enumerate(args.names):
        out = args.out_dir / name
        if (out / "adapter_model.safetensors").is_file():
            print(f"{out}: exists")
            continue
        write_adapter(base, out, seed)
        print(f"{out}: written")


if __name__ == "__main__":
    main()
