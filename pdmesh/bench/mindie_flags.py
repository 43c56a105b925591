"""MindIE's benchmark flag names for ``pdmesh bench serve``, so that a command written for MindIE
(``benchmark --DatasetPath ... --DatasetType gsm8k --TestType openai --Http ...``) runs here.

Each MindIE flag sets the same thing as its ``bench serve`` twin; a MindIE flag given wins.
``--WorkersNum`` is accepted for compatibility (requests here run concurrently in one event loop);
``--TaskKind`` must be ``stream``, since time to first token is measured on streams.
"""

from __future__ import annotations

import argparse
import json

# MindIE's DatasetType -> ours ("synthetic" is MindIE's generated prompts: our random ones)
DATASET_TYPES = {"gsm8k": "gsm8k", "sharegpt": "sharegpt", "synthetic": "random"}
SAMPLING_KEYS = {"temperature": "temperature", "ignore_eos": "ignore_eos", "max_tokens": "output_len"}


def add_mindie_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("MindIE benchmark names (each sets its bench serve twin)")
    add = group.add_argument
    add("--DatasetPath", dest="m_dataset_path", metavar="PATH", help="= --dataset-path (a file or directory)")
    add("--DatasetType", dest="m_dataset_type", choices=sorted(DATASET_TYPES), help="= --dataset")
    add("--ModelName", dest="m_model", metavar="NAME", help="= --model")
    add("--ModelPath", dest="m_model_path", metavar="DIR", help="the checkpoint; its tokenizer counts tokens")
    add("--Tokenizer", dest="m_tokenizer", choices=["True", "False", "true", "false"], help="use ModelPath's")
    add("--TestType", dest="m_test_type", choices=["openai"], help="the OpenAI-compatible API (the only one)")
    add("--Http", dest="m_http", metavar="URL", help="= --base-url")
    add("--MaxOutputLen", dest="m_max_output_len", type=int, metavar="N", help="= --output-len")
    add("--WarmupSize", dest="m_warmup", type=int, metavar="N", help="= --warmup")
    add("--RequestRate", dest="m_request_rate", type=float, metavar="RPS", help="= --request-rate")
    add("--Concurrency", dest="m_concurrency", type=int, metavar="N", help="= --max-concurrency")
    add(
        "--SamplingParams",
        dest="m_sampling",
        metavar="JSON",
        help='e.g. {"temperature": 0, "ignore_eos": true}',
    )
    add(
        "--WorkersNum",
        dest="m_workers",
        type=int,
        metavar="N",
        help="accepted; requests run concurrently anyway",
    )
    add("--TaskKind", dest="m_task_kind", choices=["stream", "text"], help="stream (the only one measured)")


def apply_mindie_flags(args: argparse.Namespace) -> None:
    """Moves the MindIE flags that were given onto their ``bench serve`` twins; ValueError if bad."""
    simple = {
        "m_dataset_path": "dataset_path",
        "m_model": "model",
        "m_http": "base_url",
        "m_max_output_len": "output_len",
        "m_warmup": "warmup",
        "m_request_rate": "request_rate",
        "m_concurrency": "max_concurrency",
    }
    for mindie, ours in simple.items():
        if getattr(args, mindie) is not None:
            setattr(args, ours, getattr(args, mindie))
    if args.m_dataset_type is not None:
        args.dataset = DATASET_TYPES[args.m_dataset_type]
    tokenizer_wanted = (args.m_tokenizer or "true").lower() == "true"
    if args.m_model_path is not None and tokenizer_wanted and args.tokenizer is None:
        args.tokenizer = args.m_model_path
    if args.m_task_kind == "text":
        raise ValueError("--TaskKind text: pdmesh bench serve measures streams (TTFT needs them); use stream")
    if args.m_sampling is not None:
        for key, value in _sampling(args.m_sampling).items():
            setattr(args, SAMPLING_KEYS[key], value)


def _sampling(text: str) -> dict:
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--SamplingParams is not JSON: {exc.msg}") from None
    if not isinstance(params, dict):
        raise ValueError("--SamplingParams must be a JSON object")
    unknown = sorted(set(params) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(
            f"--SamplingParams: unsupported {', '.join(unknown)} (known: {', '.join(SAMPLING_KEYS)})"
        )
    return params
