"""Fine-tuning on a tiny random model: the loss falls, checkpoints resume exactly, Ctrl-C
keeps the last checkpoint, and the output loads in PEFT and in loraplex with equal outputs."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from loraplex.train.checkpoint import CHECKPOINT_FILE
from loraplex.train.files import atomic_write
from loraplex.train.config import FinetuneConfig
from loraplex.train.data import collate, load_examples
from loraplex.train.demo_data import make_examples, write_jsonl
from loraplex.train.finetune import finetune, loss_sum


@pytest.fixture(scope="module")
def task_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("task")
    return (write_jsonl(make_examples("iso-date", 48, "train"), folder / "train.jsonl"),
            write_jsonl(make_examples("iso-date", 16, "eval"), folder / "eval.jsonl"))


@pytest.fixture(scope="module")
def tiny(tiny_model: Callable[..., Path]) -> Path:
    return tiny_model(seed=5)


def config(tiny: Path, files: tuple[Path, Path], out: Path, **kwargs: Any) -> FinetuneConfig:
    defaults = dict(model=str(tiny), data=str(files[0]), eval=str(files[1]), out=str(out),
                    rank=4, alpha=8.0, lr=1e-2, batch_size=8, seed=1)
    return FinetuneConfig(**{**defaults, **kwargs})


def test_loss_sum_equals_transformers_loss(tiny: Path, task_files: tuple[Path, Path]) -> None:
    """Our head-only-where-labelled loss is transformers' own loss, with LoRA active."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = collate(load_examples(task_files[0], AutoTokenizer.from_pretrained(tiny), 512)[:4], 2)
    total, count = loss_sum(model, batch)
    expected = model(**batch).loss
    assert count == int((batch["labels"][:, 1:] != -100).sum()) > 0
    torch.testing.assert_close(total / count, expected, rtol=1e-5, atol=1e-5)


def test_finetune_lowers_eval_loss_and_writes_a_peft_folder(
        tiny: Path, task_files: tuple[Path, Path], tmp_path: Path) -> None:
    result = finetune(config(tiny, task_files, tmp_path / "out", steps=12, save_dtype="float16"),
                      show_progress=False)
    losses = [h["eval_loss"] for h in result.history]
    assert [h["step"] for h in result.history] == [0, 6, 12]  # before, then after each epoch
    assert losses[-1] < losses[0] - 1.0, losses
    assert result.num_steps == 12 and result.tokens_per_second > 0
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {"adapter_config.json", "adapter_model.safetensors", "finetune_log.json"}
    weights = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float16}
    assert len(weights) == 2 * 7 * 2  # lora_A and lora_B of 7 projections in 2 layers
    adapter_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8


def test_interrupt_keeps_the_checkpoint_and_resume_continues_exactly(
        tiny: Path, task_files: tuple[Path, Path], tmp_path: Path) -> None:
    """Ctrl-C (KeyboardInterrupt) at step 5: the step-4 checkpoint survives; the same command
    then continues from step 5 and ends with the weights of an uninterrupted run."""
    straight = finetune(config(tiny, task_files, tmp_path / "straight", steps=8, save_every=2),
                        show_progress=False)

    def interrupt_at_5(step: int, loss: float) -> None:
        if step == 5:
            raise KeyboardInterrupt

    run = config(tiny, task_files, tmp_path / "resumed", steps=8, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        finetune(run, on_step=interrupt_at_5, show_progress=False)
    saved = torch.load(tmp_path / "resumed" / CHECKPOINT_FILE, weights_only=True)
    assert saved["step"] == 4
    assert not (tmp_path / "resumed" / "adapter_model.safetensors").exists()
    assert [p.name for p in (tmp_path / "resumed").iterdir()] == [CHECKPOINT_FILE]  # no temp file

    # Another run's flags are refused, naming the field; the checkpoint is untouched.
    with pytest.raises(ValueError, match=r"checkpoint of another run \(rank: 4 there, 8 now\)"):
        finetune(config(tiny, task_files, tmp_path / "resumed", steps=8, rank=8),
                 show_progress=False)

    steps_seen: list[int] = []
    resumed = finetune(run, on_step=lambda step, loss: steps_seen.append(step),
                       show_progress=False)
    assert steps_seen == [5, 6, 7, 8]
    assert resumed.num_steps == 8
    assert resumed.history == straight.history  # eval losses, including the one before step 4
    assert not (tmp_path / "resumed" / CHECKPOINT_FILE).exists()
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)

    with pytest.raises(ValueError, match="already holds a finished adapter"):
        finetune(run, show_progress=False)


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path: Path) -> None:
    target = tmp_path / CHECKPOINT_FILE
    torch.save({"step": 4}, target)

    def interrupted(tmp: str) -> None:
        Path(tmp).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)
    assert torch.load(target, weights_only=True) == {"step": 4}
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]


def test_output_loads_in_peft_and_loraplex_with_equal_greedy_outputs(
        tiny: Path, task_files: tuple[Path, Path], tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraplex import LLM, LoRARequest, SamplingParams

    out = tmp_path / "adapter"
    finetune(config(tiny, task_files, out, steps=6, targets="q,v,gate,down"), show_progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(
        e["messages"][:1], tokenize=False, add_generation_prompt=True), add_special_tokens=False)
        for e in make_examples("iso-date", 3, "eval", seed=7)]

    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, out).eval()

    def peft_greedy(prompt: list[int], with_adapter: bool) -> list[int]:
        ids = torch.tensor([prompt])
        if with_adapter:
            generated = peft_model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
        else:
            with peft_model.disable_adapter():
                generated = peft_model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
        return generated[0, len(prompt):].tolist()

    llm = LLM(str(tiny), dtype="float32", kv_cache_gib=0.02, max_lora_rank=8)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params, lora=LoRARequest("tuned", str(out)))
    base_outs = llm.generate(prompts, params)
    for prompt, lora_out, base_out in zip(prompts, outs, base_outs):
        assert list(lora_out.token_ids) == peft_greedy(prompt, True)
        assert list(base_out.token_ids) == peft_greedy(prompt, False)
    # The adapter changes what the model says, so the comparison above tests it.
    assert [list(o.token_ids) for o in outs] != [list(o.token_ids) for o in base_outs]


def test_cli_finetune_writes_the_adapter_and_says_how_to_serve_it(
        tiny: Path, task_files: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from loraplex import cli

    out = tmp_path / "cli-adapter"
    code = cli.main(["finetune", "--model", str(tiny), "--data", str(task_files[0]), "--eval",
                     str(task_files[1]), "--out", str(out), "--steps", "3", "--rank", "2",
                     "--targets", "q,v", "--lr", "1e-2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "finetune: 100%" in captured.err and "tok_s=" in captured.err  # the progress bar
    assert "epoch 1 (step 3): train loss " in captured.out
    assert f"{out}: PEFT adapter after 3 steps; eval loss " in captured.out
    assert f"--adapter cli-adapter={out}" in captured.out
    assert (out / "adapter_model.safetensors").is_file()


def test_ctrl_c_on_the_command_line_keeps_the_checkpoint(
        tiny: Path, task_files: tuple[Path, Path], tmp_path: Path) -> None:
    """A real SIGINT to ``loraplex finetune``: exit 130, a message, a loadable checkpoint."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sigint"
    process = subprocess.Popen(
        [sys.executable, "-m", "loraplex", "finetune", "--model", str(tiny), "--data",
         str(task_files[0]), "--out", str(out), "--steps", "100000", "--rank", "2",
         "--save-every", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 240
        while not (out / CHECKPOINT_FILE).exists() and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.2)
        time.sleep(1.0)  # a few more steps, so the signal may land in a step or a save
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "interrupted at step" in err and "run the same command again to resume" in err
    assert "Traceback" not in err
    state = torch.load(out / CHECKPOINT_FILE, weights_only=True)
    assert state["step"] >= 1
    assert [p.name for p in out.iterdir()] == [CHECKPOINT_FILE]  # no temp file left behind
