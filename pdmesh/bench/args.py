"""Argument types shared by the benchmark command lines."""

from __future__ import annotations

import argparse


def key_value(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (a leading ``--`` on the key is dropped), for flags such as ``--worker-arg``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.lstrip("-"), value
