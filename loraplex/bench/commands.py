"""The bodies of ``loraplex bench`` and ``loraplex explain``; cli.py only registers them.

Nothing heavy is imported here at module level: ``loraplex --help`` stays fast.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import sys
from pathlib import Path
from typing import Any

from loraplex.bench.workload import ENDPOINTS, SELECTIONS


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a rate > 0 or inf, got {text!r}")
    return value


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="The server's base URL.")
    parser.add_argument("--api-key", default=None, help="Sent as 'Authorization: Bearer KEY'.")
    parser.add_argument("--models", required=True,
                        help="Comma-separated model names to spread requests over: the base "
                        "model's id and/or adapter names.")
    parser.add_argument("--selection", choices=SELECTIONS, default="round-robin",
                        help="How each request picks its model (zipf: the first is the most popular).")
    parser.add_argument("--zipf-exponent", type=float, default=1.0)
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--request-rate", type=_rate, default=math.inf,
                        help="Requests per second, Poisson arrivals; inf sends all at once.")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="Most requests in flight at once (default: no limit).")
    parser.add_argument("--input-len", type=int, default=128, help="Prompt tokens (random dataset).")
    parser.add_argument("--output-len", type=int, default=128,
                        help="max_tokens per request (exact with --ignore-eos).")
    parser.add_argument("--dataset", default="random",
                        help="random (real words, exactly --input-len tokens) or a JSONL file "
                        "of {\"prompt\": ...} or {\"messages\": [...]} lines.")
    parser.add_argument("--endpoint", choices=ENDPOINTS, default="completions")
    parser.add_argument("--tokenizer", default=None,
                        help="Model name or folder whose tokenizer builds the prompts; default "
                        "the served base model when it is known locally.")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="Ask for exactly max_tokens tokens (a loraplex/vLLM extra).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="Seconds per request.")
    parser.add_argument("--out", default=None, help="Write the results here as JSON (atomically).")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def _find_tokenizer(args: argparse.Namespace, models: list[str]) -> Any:
    """``--tokenizer``, else the first of the served base model's id and the given names
    that is a model this machine has."""
    from loraplex.models.registry import resolve_model
    from loraplex.models.tokenizer import Tokenizer

    if args.tokenizer:
        return Tokenizer(resolve_model(args.tokenizer))
    candidates = []
    try:
        import httpx
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        listed = httpx.get(args.url.rstrip("/") + "/v1/models", headers=headers, timeout=30).json()
        for card in listed.get("data", []):
            candidates.append(card.get("parent") or card.get("root") or card["id"])
    except Exception:  # the benchmark itself will report an unreachable server
        pass
    for name in dict.fromkeys(candidates + models):
        try:
            return Tokenizer(resolve_model(name))
        except (ValueError, OSError):
            continue
    raise ValueError(f"tokenizer: none of {list(dict.fromkeys(candidates + models))} is a model "
                     "on this machine; pass --tokenizer NAME_OR_FOLDER")


def cmd_bench(args: argparse.Namespace) -> int:
    from loraplex.bench.client import ClientOptions, run_requests
    from loraplex.bench.report import build_results, format_table, to_json
    from loraplex.bench.stats import write_atomic
    from loraplex.bench.workload import build_requests

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise ValueError(f"models: expected comma-separated names, got {args.models!r}")
    options = ClientOptions(url=args.url, api_key=args.api_key, endpoint=args.endpoint,
                            temperature=args.temperature, ignore_eos=args.ignore_eos,
                            timeout_s=args.timeout)
    tokenizer = _find_tokenizer(args, models)
    requests = build_requests(tokenizer, models, args.num_prompts, args.selection, args.dataset,
                              args.input_len, args.output_len, args.endpoint, args.seed,
                              args.zipf_exponent)
    results, wall = asyncio.run(run_requests(options, requests, args.request_rate,
                                             args.max_concurrency, args.seed, args.progress))
    config = {k: v for k, v in vars(args).items() if k not in ("func", "api_key", "command")}
    config["models"] = models
    config["request_rate"] = "inf" if math.isinf(args.request_rate) else args.request_rate
    doc = build_results(results, wall, config)
    print(format_table(doc))
    if args.out:
        write_atomic(args.out, to_json(doc))
        print(f"results written to {args.out}")
    return 0 if doc["failed"] == 0 else 1


def add_explain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="The base model (name or folder).")
    parser.add_argument("--adapter", required=True, help="Your PEFT LoRA folder.")
    parser.add_argument("--draft", default=None,
                        help="A draft model folder for speculative decoding (trained for the adapter).")
    parser.add_argument("--quick", action="store_true",
                        help="Fewer rounds, shorter requests, concurrency 1 and 8 (about 2 minutes).")
    parser.add_argument("--out", required=True, help="Folder for report.md, results.json and plots.")
    parser.add_argument("--dtype", default="auto", help="auto | bfloat16 | float32 | float16")
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                        help="Also measure transformers + PEFT when installed.")


def cmd_explain(args: argparse.Namespace) -> int:
    from loraplex.bench.explain import ExplainConfig, run_explain

    config = ExplainConfig(model=args.model, adapter=args.adapter, draft=args.draft,
                           out=args.out, quick=args.quick, dtype=args.dtype,
                           num_threads=args.num_threads, peer=args.peer)
    report = run_explain(config, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"report written to {Path(args.out) / 'report.md'}")
    print(report.summary_line)
    return 0
