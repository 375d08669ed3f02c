"""Train the demo adapters that ship in ``examples/adapters/`` (what ``make demo`` serves).

One adapter per demo task (``loraplex demo-data``), each the same recipe with fixed seeds:
160 generated examples, 20 steps of 8 (one epoch), rank 8 on q, v, o and down_proj, saved
in float16 (~2.5 MB). A few minutes each on 2 CPU cores.

    python scripts/train_demo_adapters.py [--out examples/adapters] [--tasks json-record iso-date]

An existing adapter folder is replaced (files renamed in, never half-written).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Spinning OpenMP waits cost a lot as soon as another process shares the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = dict(rank=8, alpha=16.0, targets="q,v,o,down", steps=20, batch_size=8, lr=1e-3,
              seed=0, save_dtype="float16")
NUM_TRAIN, NUM_EVAL = 160, 32


def train_demo_adapter(task: str, out: Path, model: str = "smollm2-135m",
                       show_progress: bool = True) -> Path:
    from loraplex.train.config import FinetuneConfig
    from loraplex.train.demo_data import make_examples, write_jsonl
    from loraplex.train.files import atomic_write
    from loraplex.train.finetune import ADAPTER_FILES, finetune

    with tempfile.TemporaryDirectory(prefix=f"demo-{task}-") as tmp:
        train = write_jsonl(make_examples(task, NUM_TRAIN, "train", seed=0), Path(tmp) / "train.jsonl")
        held_out = write_jsonl(make_examples(task, NUM_EVAL, "eval", seed=0), Path(tmp) / "eval.jsonl")
        config = FinetuneConfig(data=str(train), eval=str(held_out), out=str(Path(tmp) / "adapter"),
                                model=model, **RECIPE)
        result = finetune(config, show_progress=show_progress)
        for name in ADAPTER_FILES:
            data = (result.out / name).read_bytes()
            atomic_write(out / name, lambda path: Path(path).write_bytes(data))
    losses = [h["eval_loss"] for h in result.history]
    print(f"{out}: {task}, eval loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"{(out / ADAPTER_FILES[0]).stat().st_size / 1e6:.1f} MB")
    return out


def main() -> None:
    from loraplex.train.demo_data import TASKS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "examples" / "adapters")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    for task in args.tasks:
        train_demo_adapter(task, args.out / task, args.model)


if __name__ == "__main__":
    main()
