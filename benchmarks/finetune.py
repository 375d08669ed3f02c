"""Fine-tune briefly on a demo task and measure what it bought.

Generates a demo task's train and held-out splits (``loraplex demo-data``), measures the
base model's accuracy on the held-out prompts (greedy, float32, the task's own check: the
JSON record or the date must be right), fine-tunes with ``loraplex finetune``'s code, and
measures the adapter's accuracy on the same prompts through loraplex's engine. Prints the
eval loss before and after, both accuracies and the training speed (tokens per second,
padding excluded, time spent in training steps only) as one summary line, last.

    python benchmarks/finetune.py [--task json-record] [--steps 20] [--num-eval 32]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning waits hurt on a shared CPU

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def accuracy(llm, task: str, examples: list[dict], adapter: str | None) -> int:
    from loraplex import LoRARequest, SamplingParams
    from loraplex.train.demo_data import get_task

    prompts = [llm.tokenizer.apply_chat_template(e["messages"][:1]) for e in examples]
    lora = LoRARequest("tuned", adapter) if adapter else None
    outs = llm.generate(prompts, SamplingParams(max_tokens=48, temperature=0), lora=lora)
    check = get_task(task).is_correct
    return sum(check(o.text, e["messages"][-1]["content"]) for o, e in zip(outs, examples))


def main() -> None:
    import torch
    from train_demo_adapters import NUM_TRAIN, RECIPE

    from loraplex import LLM
    from loraplex.train.config import FinetuneConfig
    from loraplex.train.demo_data import TASKS, make_examples, write_jsonl
    from loraplex.train.finetune import finetune

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="json-record", choices=list(TASKS))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=RECIPE["steps"])
    parser.add_argument("--num-train", type=int, default=NUM_TRAIN)
    parser.add_argument("--num-eval", type=int, default=32)
    args = parser.parse_args()

    recipe = {**RECIPE, "steps": args.steps, "save_dtype": "float32"}
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        train = write_jsonl(make_examples(args.task, args.num_train, "train"), Path(tmp) / "train.jsonl")
        held_out = make_examples(args.task, args.num_eval, "eval")
        eval_file = write_jsonl(held_out, Path(tmp) / "eval.jsonl")
        llm = LLM(args.model, dtype="float32", kv_cache_gib=0.25, max_lora_rank=RECIPE["rank"])
        base_correct = accuracy(llm, args.task, held_out, None)
        started = time.perf_counter()
        result = finetune(FinetuneConfig(data=str(train), eval=str(eval_file), model=args.model,
                                         out=str(Path(tmp) / "adapter"), **recipe))
        wall = time.perf_counter() - started
        tuned_correct = accuracy(llm, args.task, held_out, str(result.out))
    losses = [h["eval_loss"] for h in result.history]
    print(f"finetune.py: {args.task}, {result.num_steps} steps x {recipe['batch_size']} "
          f"(r{recipe['rank']} {recipe['targets']}, float32) | eval loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f} | held-out accuracy base {base_correct}/{args.num_eval} -> adapter "
          f"{tuned_correct}/{args.num_eval} | train {result.tokens_per_second:.0f} tok/s, "
          f"{wall:.0f} s with eval | {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
