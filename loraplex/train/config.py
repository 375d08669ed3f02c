"""FinetuneConfig: one frozen, validated dataclass; ``loraplex finetune`` flags come from it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Short names accepted by --targets (q,k,v,o,gate,up,down) -> the projections' HF names.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SAVE_DTYPES = ("float32", "bfloat16", "float16")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class FinetuneConfig:
    data: str = _help("Training JSONL: {\"messages\": [...]} (loss on assistant turns) or "
                      "{\"prompt\", \"completion\"} (loss on the completion) per line.")
    out: str = _help("Output folder: the PEFT adapter (adapter_config.json + "
                     "adapter_model.safetensors). A checkpoint.pt in it is resumed.")
    model: str = _help("Base model: embedded name (smollm2-135m) or a local HF folder.",
                       default="smollm2-135m")
    eval: str | None = _help("Held-out JSONL in the same format; its loss is reported before "
                             "training and after every epoch.", default=None)
    rank: int = _help("LoRA rank r.", default=16)
    alpha: float = _help("LoRA alpha; the update is scaled by alpha / rank.", default=32.0)
    targets: str = _help("all-linear, or a comma list of projections: q,k,v,o,gate,up,down "
                         "(or their full names, q_proj, ...).", default="all-linear")
    epochs: int = _help("Passes over the training data (when --steps is not given).", default=1)
    steps: int | None = _help("Optimizer steps in all; overrides --epochs (the data repeats "
                              "as needed).", default=None)
    lr: float = _help("Peak learning rate (AdamW; linear warm-up, then linear decay to 0).",
                      default=5e-4)
    batch_size: int = _help("Examples per optimizer step.", default=8)
    max_seq_len: int = _help("Longest example in tokens; a longer one is refused with its "
                             "line number, never truncated (that would cut the answer).",
                             default=512)
    seed: int = _help("Seed of the LoRA initialisation and the data order.", default=0)
    save_every: int = _help("Write a checkpoint every N steps (and at every epoch's end).",
                            default=50)
    save_dtype: str = _help("dtype of the saved adapter weights: float32, bfloat16 or "
                            "float16 (half the file).", default="float32")

    def __post_init__(self) -> None:
        for name in ("data", "out", "model"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name}: expected a non-empty string, got {getattr(self, name)!r}")
        positive = {"rank": self.rank, "epochs": self.epochs, "batch_size": self.batch_size,
                    "max_seq_len": self.max_seq_len, "save_every": self.save_every}
        if self.steps is not None:
            positive["steps"] = self.steps
        for name, value in positive.items():
            if type(value) is not int or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha: must be > 0, got {self.alpha!r}")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"save_dtype: expected one of {', '.join(SAVE_DTYPES)}, "
                             f"got {self.save_dtype!r}")
        self.target_modules  # validates --targets now, before any model loads

    @property
    def target_modules(self) -> str | list[str]:
        """PEFT's ``target_modules``: "all-linear" or a list of HF projection names."""
        if self.targets.strip().lower() == "all-linear":
            return "all-linear"
        names: list[str] = []
        for part in self.targets.split(","):
            name = part.strip()
            name = name if name.endswith("_proj") else f"{name}_proj"
            if name not in PROJECTIONS:
                raise ValueError(f"targets: {part.strip()!r} is not a projection; expected "
                                 f"all-linear or a comma list of q,k,v,o,gate,up,down")
            if name not in names:
                names.append(name)
        return names
