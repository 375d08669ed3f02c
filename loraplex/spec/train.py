"""``loraplex train-draft``: distil a small draft model for a target (+ adapter).

1. The draft starts as a slice of the target: its embedding, final norm and head, and
   ``layers`` of its decoder layers, evenly spaced (first and last included).
2. The target (with the adapter, run by this engine) writes a continuation of every
   training prompt: the text the draft must learn to predict is the target's own.
3. Distillation: on prompt + continuation, the draft's next-token distribution is pulled
   towards the target's (transformers + PEFT compute the target's logits) by
   KL(target || draft) over the continuation positions. Embedding and head stay frozen
   (they are the target's); the copied layers and norms learn.
4. Acceptance on held-out prompts is measured by this engine's speculative decoding
   (greedy, ``eval_tokens`` drafts per step), before and after training.
5. The draft vocabulary (``--draft-vocab`` ids, spec/proposer.py): the tokens of the
   training prompts and the target's continuations, most frequent first, then the lowest
   remaining ids (BPE gives its earliest, most frequent merges the lowest ids), plus the
   end-of-sequence ids. The draft's head scores only those.

The output is a Hugging Face folder (config, safetensors, tokenizer) usable as
``--draft`` or ``--draft-for ADAPTER=DIR``; it is written to a temporary folder beside
``out`` and renamed into place, so ``out`` never holds half a model.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from loraplex.config import _help
from loraplex.spec.proposer import DRAFT_VOCAB_FILE


@dataclass(frozen=True)
class DraftTrainConfig:
    model: str = _help("Target model: embedded name or HF folder.", default="smollm2-135m")
    adapter: str | None = _help("PEFT adapter the draft is trained for (applied to the "
                                "target).", default=None)
    data: str | None = _help("JSONL prompts: one {\"prompt\": ...}, {\"text\": ...} or "
                             "{\"messages\": [...]} per line.", default=None)
    out: str | None = _help("Folder to write the draft to (must not exist).", default=None)
    layers: int = _help("Decoder layers of the draft, copied from the target evenly spaced.",
                        default=2)
    steps: int = _help("Optimisation steps.", default=200)
    batch_size: int = _help("Sequences per step.", default=4)
    lr: float = _help("AdamW learning rate.", default=3e-4)
    max_new_tokens: int = _help("Length of the target's continuation of each prompt.",
                                default=64)
    temperature: float = _help("Sampling temperature of those continuations (0: greedy).",
                               default=0.7)
    num_held_out: int = _help("Prompts kept out of training to measure acceptance.",
                              default=8)
    eval_tokens: int = _help("Draft tokens per step when measuring acceptance.", default=4)
    max_prompt_tokens: int = _help("Longer prompts are cut to their last tokens.",
                                   default=256)
    draft_vocab: int = _help("Token ids the draft may propose (its head keeps only "
                             "those rows): the most frequent in the training data first; "
                             "0: the whole vocabulary.", default=8192)
    seed: int = _help("Seed of continuations, batches and held-out choice.", default=0)
    num_threads: int | None = _help("CPU threads; default all this process may use.",
                                    default=None)

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("data: a JSONL file of prompts is required")
        if not self.out:
            raise ValueError("out: an output folder is required")
        for name in ("layers", "steps", "batch_size", "max_new_tokens", "num_held_out",
                     "eval_tokens", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.draft_vocab < 0:
            raise ValueError(f"draft_vocab: must be >= 0, got {self.draft_vocab}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")


@dataclass(frozen=True)
class DraftTrainReport:
    out: str
    layer_ids: list[int]
    num_train_prompts: int
    num_held_out: int
    first_loss: float
    last_loss: float  # mean KL of the last 10% of steps
    acceptance_before: float
    acceptance_after: float
    tokens_per_step_before: float
    tokens_per_step_after: float
    draft_vocab_size: int  # token ids the draft's head scores
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"train-draft: {self.out} ({len(self.layer_ids)} layers {self.layer_ids}) | "
                f"KL {self.first_loss:.3f} -> {self.last_loss:.3f} | held-out acceptance "
                f"{self.acceptance_before:.2f} -> {self.acceptance_after:.2f}, tokens/step "
                f"{self.tokens_per_step_before:.2f} -> {self.tokens_per_step_after:.2f} "
                f"({self.num_held_out} prompts) | draft vocabulary {self.draft_vocab_size} ids")


def read_prompts(path: Path, tokenizer: Any) -> list[list[int]]:
    """Token ids of every prompt in a JSONL file; errors name the line."""
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"data: line {number} of {str(path)!r} is not JSON ({e})") from None
        if isinstance(row, dict) and isinstance(row.get("messages"), list):
            prompts.append(tokenizer.apply_chat_template(row["messages"]))
        elif isinstance(row, dict) and isinstance(row.get("prompt", row.get("text")), str):
            prompts.append(tokenizer.encode(row.get("prompt", row.get("text"))))
        else:
            raise ValueError(f"data: line {number} of {str(path)!r} has no \"prompt\", "
                             "\"text\" or \"messages\"")
    return [p for p in prompts if p]


def pick_layers(num_layers: int, num_draft_layers: int) -> list[int]:
    """``num_draft_layers`` indices spread evenly over the target's layers."""
    if num_draft_layers >= num_layers:
        return list(range(num_layers))
    if num_draft_layers == 1:
        return [0]
    step = (num_layers - 1) / (num_draft_layers - 1)
    return sorted({round(i * step) for i in range(num_draft_layers)})


def build_draft(target: Any, layer_ids: list[int]) -> Any:
    """A transformers model made of the target's embedding, head and ``layer_ids``."""
    from transformers import AutoModelForCausalLM

    config = target.config.__class__.from_dict(target.config.to_dict())
    config.num_hidden_layers = len(layer_ids)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layer_ids]
    draft = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    source = target.state_dict()
    renamed = {}
    for name, value in source.items():
        parts = name.split(".")
        if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers":
            index = int(parts[2])
            if index not in layer_ids:
                continue
            parts[2] = str(layer_ids.index(index))
        renamed[".".join(parts)] = value
    missing, unexpected = draft.load_state_dict(renamed, strict=False)
    assert not unexpected and all("lm_head" in m or "rotary" in m for m in missing), (missing, unexpected)
    if config.tie_word_embeddings:
        draft.tie_weights()
    return draft


def draft_vocab(sequences: list[list[int]], eos_ids: set[int], vocab_size: int,
                size: int) -> list[int]:
    """``size`` token ids (all when 0 or >= vocab_size): the end-of-sequence ids, then the
    ids of ``sequences`` by descending count, then the lowest ids not yet in."""
    if size == 0 or size >= vocab_size:
        return list(range(vocab_size))
    counts = Counter(t for seq in sequences for t in seq)
    chosen = dict.fromkeys(t for t in sorted(eos_ids) if t < vocab_size)  # ordered set
    chosen.update(dict.fromkeys(t for t, _ in counts.most_common()))
    for t in range(vocab_size):
        if len(chosen) >= size:
            break
        chosen.setdefault(t)
    return list(chosen)[:size]


def save_folder_atomically(model: Any, tokenizer_from: Path, out: Path,
                           vocab_ids: list[int] | None = None) -> None:
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if vocab_ids is not None and len(vocab_ids) < model.config.vocab_size:
            (tmp / DRAFT_VOCAB_FILE).write_text(json.dumps({"token_ids": vocab_ids}))
        for src in tokenizer_from.iterdir():
            if src.is_file() and ("token" in src.name or src.name.endswith(".jinja")
                                  or src.name == "generation_config.json"):
                shutil.copy(src, tmp / src.name)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def measure_acceptance(target_path: Path, draft_path: Path, adapter: str | None,
                       prompts: list[list[int]], config: DraftTrainConfig) -> tuple[float, float]:
    """(acceptance rate, tokens per step) of greedy speculative decoding on ``prompts``."""
    from loraplex import LLM, LoRARequest, SamplingParams, SpecConfig

    llm = LLM(str(target_path), dtype="float32", kv_cache_gib=0.25,
              num_threads=config.num_threads, max_lora_rank=64,
              speculative=SpecConfig("draft", draft_model=str(draft_path),
                                     num_tokens=config.eval_tokens, max_spec_seqs=1024))
    lora = LoRARequest("adapter", adapter) if adapter else None
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=config.max_new_tokens),
                 lora=lora)
    stats = next(iter(llm.engine.spec.stats.values()), None)
    if stats is None or not stats.num_steps:
        return 0.0, 1.0
    return stats.acceptance_rate or 0.0, 1 + stats.mean_accepted_length


def train_draft(config: DraftTrainConfig, progress: bool = True) -> DraftTrainReport:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from loraplex import LLM, LoRARequest, SamplingParams
    from loraplex.models.loader import read_arch
    from loraplex.models.registry import resolve_model
    from loraplex.models.tokenizer import Tokenizer

    out = Path(config.out)
    if out.exists():
        raise ValueError(f"out: {str(out)!r} already exists; choose a new folder")
    if config.adapter and importlib.util.find_spec("peft") is None:
        raise ValueError("adapter: train-draft with an adapter needs PEFT "
                         "(pip install 'loraplex[train]')")
    data = Path(config.data)
    if not data.is_file():
        raise ValueError(f"data: {str(data)!r} is not a file")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    target_path = resolve_model(config.model)
    prompts = [p[-config.max_prompt_tokens:] for p in read_prompts(data, Tokenizer(target_path))]
    if len(prompts) <= config.num_held_out:
        raise ValueError(f"data: {len(prompts)} prompts leave none to train on after "
                         f"num_held_out {config.num_held_out}")
    g = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(prompts), generator=g).tolist()
    held_out = [prompts[i] for i in order[:config.num_held_out]]
    train = [prompts[i] for i in order[config.num_held_out:]]

    # The target's own continuations (with its adapter), generated by this engine.
    llm = LLM(str(target_path), dtype="float32", kv_cache_gib=0.25,
              num_threads=config.num_threads, max_lora_rank=64)
    lora = LoRARequest("adapter", config.adapter) if config.adapter else None
    torch.manual_seed(config.seed)
    outs = llm.generate(train, SamplingParams(temperature=config.temperature,
                                              max_tokens=config.max_new_tokens), lora=lora)
    sequences = [(p, o.token_ids) for p, o in zip(train, outs) if o.token_ids]
    del llm
    vocab_ids = draft_vocab([p + c for p, c in sequences],
                            set(Tokenizer(target_path).eos_token_ids),
                            read_arch(target_path).vocab_size, config.draft_vocab)

    teacher = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    layer_ids = pick_layers(teacher.config.num_hidden_layers, config.layers)
    draft = build_draft(teacher, layer_ids)  # base weights: the adapter is not merged in
    if config.adapter:
        from peft import PeftModel

        teacher = PeftModel.from_pretrained(teacher, config.adapter).eval()
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "draft"
        save_folder_atomically(draft, target_path, before, vocab_ids)
        acceptance_before = measure_acceptance(target_path, before, config.adapter, held_out, config)

    for name, param in draft.named_parameters():
        param.requires_grad_("embed_tokens" not in name and "lm_head" not in name)
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=config.lr)
    losses: list[float] = []
    draft.train()
    bar = tqdm(range(config.steps), desc="train-draft", disable=not progress)
    for _ in bar:
        picks = torch.randint(len(sequences), (config.batch_size,), generator=g).tolist()
        ids, mask, targets = _batch([sequences[i] for i in picks])
        with torch.no_grad():
            teacher_logp = teacher(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        draft_logp = draft(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        # KL(target || draft) per position, averaged over the continuation positions.
        kl = F.kl_div(draft_logp, teacher_logp, log_target=True, reduction="none").sum(-1)
        loss = (kl * targets).sum() / targets.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(kl=f"{losses[-1]:.3f}")
    draft.eval()
    for param in draft.parameters():
        param.requires_grad = False
    save_folder_atomically(draft, target_path, out, vocab_ids)
    acceptance_after = measure_acceptance(target_path, out, config.adapter, held_out, config)
    tail = losses[-max(1, len(losses) // 10):]
    report = DraftTrainReport(
        out=str(out), layer_ids=layer_ids, num_train_prompts=len(sequences),
        num_held_out=len(held_out), first_loss=losses[0], last_loss=sum(tail) / len(tail),
        acceptance_before=acceptance_before[0], acceptance_after=acceptance_after[0],
        tokens_per_step_before=acceptance_before[1], tokens_per_step_after=acceptance_after[1],
        draft_vocab_size=len(vocab_ids), extra={"config": asdict(config)})
    (out / "draft_training.json").write_text(json.dumps(asdict(report), indent=2))
    return report


def _batch(rows: list[tuple[list[int], list[int]]]
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T], attention mask [B, T], and a float mask [B, T] of the
    positions whose next token is part of the continuation (what the draft must predict)."""
    length = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    targets = torch.zeros(len(rows), length)
    for i, (prompt, cont) in enumerate(rows):
        tokens = prompt + cont
        ids[i, :len(tokens)] = torch.tensor(tokens)
        mask[i, :len(tokens)] = 1
        # Position t predicts token t + 1: from the last prompt token to the one before last.
        targets[i, len(prompt) - 1:len(tokens) - 1] = 1
    return ids, mask, targets
