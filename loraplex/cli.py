"""Command line: ``loraplex serve | generate | merge | finetune | demo-data | train-draft | pull | bench | explain``.

Engine flags are built from the config dataclasses' fields and help texts, so the CLI,
``LLM(...)`` and the server take the same options under the same names.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from loraplex.bench.commands import (add_bench_arguments, add_explain_arguments, cmd_bench,
                                     cmd_explain)
from loraplex.config import CONFIG_PARTS, ServerConfig
from loraplex.distributed.config import RayServeConfig
from loraplex.train.config import FinetuneConfig


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    for part in CONFIG_PARTS.values():
        add_config_flags(parser, part)


def add_config_flags(parser: argparse.ArgumentParser, part: type) -> None:
    """One flag per field of the config dataclass ``part``, with the field's help text."""
    group = parser.add_argument_group(part.__name__)
    for f in dataclasses.fields(part):
        # metadata["flag"] overrides the flag's name; "repeat" makes it repeatable.
        flag = "--" + f.metadata.get("flag", f.name.replace("_", "-"))
        kind = _flag_type(f)
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=f.default, help=f.metadata["help"])
        elif f.metadata.get("repeat"):
            group.add_argument(flag, dest=f.name, action="append", default=[],
                               help=f.metadata["help"])
        elif f.default is dataclasses.MISSING:  # a field without a default is a required flag
            group.add_argument(flag, dest=f.name, type=kind, required=True, help=f.metadata["help"])
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=f.default,
                               help=f.metadata["help"])


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for part in CONFIG_PARTS.values() for f in dataclasses.fields(part)}


def config_from_args(part: type, args: argparse.Namespace) -> Any:
    return part(**{f.name: getattr(args, f.name) for f in dataclasses.fields(part)})


def _flag_type(f: dataclasses.Field) -> type:
    annotation = str(f.type)
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if annotation.startswith(name):
            return kind
    return str


def cmd_generate(args: argparse.Namespace) -> int:
    from loraplex.llm import LLM
    from loraplex.sampling import SamplingParams

    from loraplex.lora.request import LoRARequest

    # Flags first: a bad value must not cost a model load.
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    llm = LLM(**engine_options(args))
    prompt: str | list[int] = args.prompt
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    lora = LoRARequest(Path(args.adapter).name, args.adapter) if args.adapter else None
    for text in llm.stream(prompt, params, lora=lora):
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from loraplex.config import EngineConfig
    from loraplex.server.launch import serve

    # Every flag is checked before the model loads.
    server_config = config_from_args(ServerConfig, args)
    engine_config = EngineConfig.from_flat(**engine_options(args))
    adapters: dict[str, str] = {}
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"adapter: expected NAME=PATH, got {spec!r}")
        if name in adapters:
            raise ValueError(f"adapter: {name!r} is given twice")
        adapters[name] = path
    ray_config = config_from_args(RayServeConfig, args)
    if ray_config.is_distributed:  # only then is Ray imported
        from loraplex.distributed.app import serve_on_ray

        serve_on_ray(engine_config, server_config, ray_config, adapters)
    else:
        serve(engine_config, server_config, adapters)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from loraplex.config import DTYPES
    from loraplex.lora.merge import merge_to_folder
    from loraplex.models.registry import resolve_model

    weights = None
    if args.weights is not None:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise ValueError(f"weights: expected comma-separated numbers, got {args.weights!r}") from None
    print(merge_to_folder(resolve_model(args.model), args.adapter, Path(args.out), weights,
                          DTYPES[args.dtype]))
    return 0


def cmd_train_draft(args: argparse.Namespace) -> int:
    from loraplex.spec.train import DraftTrainConfig, train_draft

    print(train_draft(config_from_args(DraftTrainConfig, args)).summary())
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from loraplex.models.registry import pull

    print(pull(args.name, force=args.force))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from loraplex.train.finetune import cmd_finetune as run

    return run(args)


def cmd_demo_data(args: argparse.Namespace) -> int:
    from loraplex.train.demo_data import cmd_demo_data as run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    srv = sub.add_parser("serve", help="Serve the OpenAI-compatible API (completions, chat, "
                         "adapters by name in the model field).")
    srv.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                     help="A PEFT LoRA folder served as the shared model NAME (repeatable).")
    add_config_flags(srv, ServerConfig)
    add_config_flags(srv, RayServeConfig)
    add_engine_flags(srv)
    srv.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="Generate text for one prompt, streamed to the terminal.")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="Wrap the prompt in the chat template.")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--adapter", default=None, help="A PEFT LoRA folder to apply (unmerged).")
    add_engine_flags(gen)
    gen.set_defaults(func=cmd_generate)

    mg = sub.add_parser("merge", help="Merge adapters into the base: a standalone Hugging Face "
                        "folder that transformers and loraplex load.")
    mg.add_argument("--model", default="smollm2-135m", help="Base: embedded name or HF folder.")
    mg.add_argument("--adapter", action="append", required=True, metavar="PATH",
                    help="A PEFT LoRA folder (repeat to merge several).")
    mg.add_argument("--weights", default=None, metavar="W1,W2,...",
                    help="One weight per adapter: the merge adds sum(w_i * delta_i); default 1 each.")
    mg.add_argument("--out", required=True, help="New folder to write (must not exist).")
    mg.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16",
                    help="Dtype of the written weights; the sum is computed in float32.")
    mg.set_defaults(func=cmd_merge)

    from loraplex.spec.train import DraftTrainConfig

    td = sub.add_parser("train-draft", help="Distil a small draft model for a target (and "
                        "adapter) for speculative decoding; reports acceptance before/after.")
    add_config_flags(td, DraftTrainConfig)
    td.set_defaults(func=cmd_train_draft)

    pl = sub.add_parser("pull", help="Convert an embedded model into the local cache now.")
    pl.add_argument("name", nargs="?", default="smollm2-135m")
    pl.add_argument("--force", action="store_true", help="Convert again even if cached.")
    pl.set_defaults(func=cmd_pull)

    ft = sub.add_parser("finetune", help="Fine-tune a LoRA adapter on a JSONL file into a PEFT "
                        "folder (resumes a checkpoint in --out; Ctrl-C keeps it).")
    add_config_flags(ft, FinetuneConfig)
    ft.set_defaults(func=cmd_finetune)

    dd = sub.add_parser("demo-data", help="Write a generated demo task as training JSONL.")
    dd.add_argument("task", help="json-record (a sentence -> a JSON record) or iso-date "
                    "(a date in 8 styles -> YYYY-MM-DD).")
    dd.add_argument("--out", required=True, help="The JSONL file to write.")
    dd.add_argument("--num-examples", type=int, default=400)
    dd.add_argument("--split", default="train", help="train or eval: the two never share a prompt.")
    dd.add_argument("--seed", type=int, default=0)
    dd.set_defaults(func=cmd_demo_data)

    bn = sub.add_parser("bench", help="Load-test a running OpenAI-compatible server: TTFT, "
                        "TPOT, ITL, E2EL and throughput over base and adapters.")
    add_bench_arguments(bn)
    bn.set_defaults(func=cmd_bench)

    ex = sub.add_parser("explain", help="Measure why your adapter is slower than the base "
                        "model, in-process, and write report.md with plots.")
    add_explain_arguments(ex)
    ex.set_defaults(func=cmd_explain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:  # bad user input: one clear line, no traceback
        print(f"loraplex: error: {e}", file=sys.stderr)
        return 2
