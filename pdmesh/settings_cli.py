"""Command-line flags generated from a pydantic settings model, so flags, environment variables
(``PDMESH_<SERVICE>_<FIELD>``) and defaults stay one list."""

from __future__ import annotations

import argparse

from pydantic import ValidationError
from pydantic_settings import BaseSettings


def add_config_flags(
    parser: argparse.ArgumentParser, model: type[BaseSettings], skip: tuple[str, ...] = ()
) -> None:
    """One ``--field-name`` flag per field (default: unset, so the environment and defaults apply)."""
    for name, field in model.model_fields.items():
        if name not in skip:
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            flag = str(extra.get("flag", name.replace("_", "-")))
            repeat = "list[" in str(field.annotation)  # a list field: the flag may be given several times
            parser.add_argument(
                "--" + flag,
                dest=name,
                default=None,
                action="append" if repeat else "store",
                help=field.description,
            )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")


def config_from_flags(
    parser: argparse.ArgumentParser, model: type[BaseSettings], args: argparse.Namespace, **fixed
):
    """The validated settings; on bad values exits 2 with one line naming each bad field."""
    given = {k: v for k, v in vars(args).items() if v is not None and k in model.model_fields}
    given.update(fixed)
    try:
        return model(**given)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        parser.exit(2, f"{parser.prog}: invalid configuration: {problems}\n")
