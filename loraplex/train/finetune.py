"""LoRA fine-tuning: a JSONL file -> a PEFT adapter folder loraplex serves and PEFT loads.

PEFT puts the LoRA layers into transformers' model; the loop is our own, because on a CPU
the time goes to the output head: its 49152-word logits cost as much as the rest of a 135M
model, and we compute them only at the positions that carry a loss (the answers), which
roughly doubles training speed over ``model(labels=...)``. float32 throughout: on a CPU
without AMX, bf16 autocast was slower (casting the weights every step costs more than the
bf16 matrix products save).

Resuming is automatic: a ``checkpoint.pt`` in ``--out`` from the same run (same flags and
data) is continued from its step; one from another run is refused. Ctrl-C stops at once and
leaves the last checkpoint whole; running the same command again continues it. When
training ends, the adapter is written and the checkpoint deleted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from loraplex.train.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from loraplex.train.config import FinetuneConfig
from loraplex.train.data import IGNORE_INDEX, Example, collate, load_examples, make_batches
from loraplex.train.files import atomic_write, file_sha256

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
LOG_FILE = "finetune_log.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class FinetuneResult:
    out: Path
    num_steps: int
    history: list[dict[str, Any]]  # {"step", "epoch", "eval_loss"}; step 0 is before training
    train_loss: float  # mean token loss over the last epoch's steps run in this call
    tokens_per_second: float  # training tokens (padding excluded) per second, this call


def loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies, number of loss tokens) of a batch of a PEFT causal LM.

    Equal to transformers' loss (``model(labels=...)``), but the head runs only where a
    label is: hidden [B, T, H] -> the N labelled positions [N, H] -> logits [N, V].
    """
    base = model.get_base_model()
    hidden = base.get_decoder()(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    is_loss = targets != IGNORE_INDEX  # [B, T-1]
    logits = base.get_output_embeddings()(hidden[:, :-1][is_loss])  # [N, V]
    return F.cross_entropy(logits.float(), targets[is_loss], reduction="sum"), int(is_loss.sum())


@torch.no_grad()
def eval_loss(model: Any, examples: list[Example], batch_size: int, pad_token_id: int) -> float:
    """Mean token loss over ``examples``."""
    model.eval()
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    total, count = 0.0, 0
    for i in range(0, len(ordered), batch_size):
        loss, n = loss_sum(model, collate(ordered[i:i + batch_size], pad_token_id))
        total, count = total + float(loss), count + n
    return total / max(count, 1)


def train_step(model: Any, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               lr: float) -> tuple[float, int]:
    """One optimizer step on the batch's mean token loss; (that loss, non-padding tokens)."""
    model.train()
    loss, num_loss_tokens = loss_sum(model, batch)
    (loss / num_loss_tokens).backward()
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach()) / num_loss_tokens, int(batch["attention_mask"].sum())


def learning_rate(peak: float, step: int, total_steps: int) -> float:
    """lr of the 0-based ``step``: linear warm-up over 10% (at most 20 steps), linear decay."""
    warmup = max(1, min(20, total_steps // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (total_steps - step) / max(1, total_steps - warmup)


@contextlib.contextmanager
def _ctrl_c_between_steps():
    """Yields a function that says whether Ctrl-C was pressed. A first SIGINT only sets it,
    and the loop stops after the step it is in: a KeyboardInterrupt raised at an arbitrary
    point can land in a finalizer, where Python prints and drops it, and training would go
    on. A second SIGINT interrupts at once. Outside the main thread, nothing is installed."""
    pressed = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield pressed.is_set
        return

    def on_sigint(signum: int, frame: Any) -> None:
        pressed.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield pressed.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def finetune(config: FinetuneConfig, on_step: Callable[[int, float], None] | None = None,
             show_progress: bool = True) -> FinetuneResult:
    """Train, resuming ``config.out``'s checkpoint if it has one; ``on_step(step, loss)``
    runs after every optimizer step (and its checkpoint)."""
    from transformers import AutoTokenizer

    from loraplex.models.registry import resolve_model

    out = Path(config.out)
    if (out / ADAPTER_FILES[0]).exists() and not (out / CHECKPOINT_FILE).exists():
        raise ValueError(f"out: {str(out)!r} already holds a finished adapter; choose another "
                         f"--out or delete it")
    model_path = resolve_model(config.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_examples = load_examples(config.data, tokenizer, config.max_seq_len, "data")
    eval_examples = (load_examples(config.eval, tokenizer, config.max_seq_len, "eval")
                     if config.eval else [])
    fingerprint = {**dataclasses.asdict(config), "model": str(model_path),
                   "data": file_sha256(config.data),
                   "eval": file_sha256(config.eval) if config.eval else None}
    for key in ("out", "save_every", "save_dtype"):  # none changes the training itself
        del fingerprint[key]
    state = load_checkpoint(out, fingerprint)  # before the model loads: a refusal is instant

    model = _lora_model(config, model_path)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=0.0)
    step, history = 0, []
    if state is not None:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state["lora_state"][name])
        optimizer.load_state_dict(state["optimizer_state"])
        step, history = state["step"], state["history"]
        print(f"loraplex: resuming {out} from its checkpoint at step {step}", file=sys.stderr)

    steps_per_epoch = math.ceil(len(train_examples) / config.batch_size)
    total_steps = config.steps or config.epochs * steps_per_epoch
    if step == 0 and eval_examples:
        history.append({"step": 0, "epoch": 0,
                        "eval_loss": eval_loss(model, eval_examples, config.batch_size, pad_token_id)})

    def checkpoint() -> None:
        save_checkpoint(out, step, fingerprint, {n: p.detach().clone() for n, p in params.items()},
                        optimizer.state_dict(), history)

    from tqdm.auto import tqdm

    progress = tqdm(total=total_steps, initial=step, unit="step", desc="finetune",
                    disable=not show_progress, dynamic_ncols=True)
    num_tokens, seconds, epoch_losses = 0, 0.0, []
    with _ctrl_c_between_steps() as ctrl_c_pressed:
        try:
            while step < total_steps:
                epoch, first = divmod(step, steps_per_epoch)
                batches = make_batches(train_examples, config.batch_size, config.seed, epoch)
                for batch in batches[first:]:
                    if step >= total_steps:
                        break
                    started = time.perf_counter()
                    mean_loss, batch_tokens = train_step(
                        model, optimizer, collate(batch, pad_token_id),
                        learning_rate(config.lr, step, total_steps))
                    step += 1
                    seconds += time.perf_counter() - started
                    num_tokens += batch_tokens
                    epoch_losses.append(mean_loss)
                    progress.update(1)
                    progress.set_postfix(loss=f"{epoch_losses[-1]:.3f}",
                                         tok_s=f"{num_tokens / seconds:.0f}", refresh=False)
                    is_epoch_end = step % steps_per_epoch == 0 or step == total_steps
                    if is_epoch_end and eval_examples:
                        loss_now = eval_loss(model, eval_examples, config.batch_size, pad_token_id)
                        history.append({"step": step, "epoch": math.ceil(step / steps_per_epoch),
                                        "eval_loss": loss_now})
                        progress.write(f"epoch {history[-1]['epoch']} (step {step}): train loss "
                                       f"{sum(epoch_losses) / len(epoch_losses):.4f}, "
                                       f"eval loss {loss_now:.4f}")
                    if is_epoch_end or step % config.save_every == 0:
                        checkpoint()
                    if on_step is not None:
                        on_step(step, epoch_losses[-1])
                    if ctrl_c_pressed():
                        raise KeyboardInterrupt
                    if is_epoch_end and step < total_steps:
                        epoch_losses = []
        except KeyboardInterrupt:
            progress.close()
            print(f"\nloraplex: interrupted at step {step}; the last checkpoint in {out} is intact: "
                  f"run the same command again to resume", file=sys.stderr)
            raise
    progress.close()
    _write_adapter(model, config, out)
    tokens_per_second = num_tokens / seconds if seconds else 0.0
    log = {"config": dataclasses.asdict(config), "num_steps": step, "history": history,
           "tokens_per_second": tokens_per_second}
    atomic_write(out / LOG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(log, indent=2)))
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)  # the adapter is final: nothing to resume
    train_loss = sum(epoch_losses) / len(epoch_losses) if epoch_losses else float("nan")
    return FinetuneResult(out, step, history, train_loss, tokens_per_second)


def _lora_model(config: FinetuneConfig, model_path: Path) -> Any:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ValueError("finetune needs the peft package: pip install 'loraplex[train]'") from e
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.config.use_cache = False  # training never decodes
    torch.manual_seed(config.seed)  # lora_A's initialisation
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                      target_modules=config.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _write_adapter(model: Any, config: FinetuneConfig, out: Path) -> None:
    """PEFT's save_pretrained into a temp folder, weights cast to ``save_dtype``, then each
    file renamed into ``out``: a reader never sees a half-written file."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".adapter-") as tmp:
        model.save_pretrained(tmp)
        weights_path = Path(tmp) / ADAPTER_FILES[0]
        dtype = _DTYPES[config.save_dtype]
        weights = {k: v.to(dtype).contiguous() for k, v in load_file(weights_path).items()}
        save_file(weights, weights_path, metadata={"format": "pt"})
        config_path = Path(tmp) / ADAPTER_FILES[1]
        adapter_config = json.loads(config_path.read_text())
        adapter_config["base_model_name_or_path"] = config.model  # as the user named it
        if isinstance(adapter_config.get("target_modules"), list):  # PEFT's set: random order
            adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
        config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
        for name in ADAPTER_FILES:
            data = (Path(tmp) / name).read_bytes()
            atomic_write(out / name, lambda path: Path(path).write_bytes(data))


def cmd_finetune(args: Any) -> int:
    """Body of ``loraplex finetune``: every flag is checked before the model loads."""
    config = FinetuneConfig(**{f.name: getattr(args, f.name)
                               for f in dataclasses.fields(FinetuneConfig)})
    try:
        result = finetune(config)
    except KeyboardInterrupt:
        return 130
    losses = [h["eval_loss"] for h in result.history]
    summary = f"; eval loss {losses[0]:.4f} -> {losses[-1]:.4f}" if len(losses) > 1 else ""
    print(f"{result.out}: PEFT adapter after {result.num_steps} steps{summary}; serve it with "
          f"loraplex serve --model {config.model} --adapter {result.out.name}={result.out}")
    return 0
