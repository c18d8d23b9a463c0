"""What the editing benchmarks share: the model, the data and the number of edits on the
command line, named settings, and ``--set KEY=VALUE`` overrides of `WiseConfig`."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from wise_edit import WiseConfig, WiseEditor, models
from wise_edit.cli import parse_overrides
from wise_edit.data import default_data_dir, load_zsre_irrelevant

# the setting of the headline results: Retrieve, a memory per 5 edits, replay, raw prompts
HEADLINE = {
    "memory.mode": "retrieve",
    "shards.size": 5,
    "memory.replay": True,
    "prompt_format": "raw",
}


def editing_parser(doc: str, edits: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=str(default_data_dir()))
    parser.add_argument("--edits", type=int, default=edits)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return parser


def fresh_editor(args: argparse.Namespace, fields: Mapping[str, Any]) -> WiseEditor:
    """A WISE editor with ``fields`` over the model's preset, on a freshly loaded model
    (so settings compared in one run never share state), ZsRE's unrelated pool."""
    model, tokenizer = models.load(args.model, device=args.device)
    config = WiseConfig.for_model(model, **fields)
    pool = load_zsre_irrelevant(args.data_dir)
    return WiseEditor(model, tokenizer, config, irrelevant_prompts=pool)


def add_settings(parser: argparse.ArgumentParser, settings: Mapping[str, Any], default: str):
    parser.add_argument("--settings", default=default, help=f"of {', '.join(settings)}")


def chosen_settings(
    parser: argparse.ArgumentParser, args: argparse.Namespace, settings: Mapping[str, Any]
) -> list[str]:
    """The comma-separated ``--settings``; an unknown name is a usage error."""
    names = args.settings.split(",")
    unknown = [n for n in names if n not in settings]
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {list(settings)}")
    return names


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--set`` fields, parsed as the CLI parses them."""
    return parse_overrides(
        argparse.Namespace(set=args.set, mode=None, layer=None, format=None), WiseEditor
    )
