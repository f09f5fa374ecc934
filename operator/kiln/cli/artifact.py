"""``kiln artifact``: make a directory a Kiln artifact (its ``metadata.json``) before registering it.

    kiln artifact hf DIR [--name NAME] [--dry-run]

``hf``: a Hugging Face directory (``save_pretrained`` output: config, tokenizer, safetensors)
becomes an ``hf-transformers`` artifact (:func:`kiln.artifact.describe_hf_directory`): every
file's sha256 in ``metadata.json``. Prints the artifact's digest, the one ``spec.import`` of a
Model needs (after the directory is copied to the artifact store). Exit status 1 when the
directory cannot be served (e.g. no tokenizer), naming what is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kiln.artifact import METADATA_FILE, ArtifactError, describe_hf_directory


def add_parser(sub: Any) -> None:
    """Add ``kiln artifact`` to the ``kiln`` parser's sub-parsers."""
    p = sub.add_parser(
        "artifact", help="write an artifact's metadata.json (e.g. of a Hugging Face directory)"
    )
    asub = p.add_subparsers(dest="artifact_command", metavar="COMMAND", required=True)
    hf = asub.add_parser(
        "hf", help="describe a Hugging Face directory as an hf-transformers artifact (an LLM)"
    )
    hf.add_argument("directory", type=Path)
    hf.add_argument("--name", default="", help="model name recorded in metadata.json")
    hf.add_argument("--dry-run", action="store_true", help="print the metadata; write nothing")
    hf.set_defaults(func=cmd_hf)


def cmd_hf(args: argparse.Namespace) -> int:
    """Write ``DIR/metadata.json`` and print the digest (or the metadata with ``--dry-run``)."""
    try:
        meta = describe_hf_directory(args.directory, model_name=args.name)
    except ArtifactError as e:
        print(f"kiln artifact hf: {e}", file=sys.stderr)
        return 1
    text = meta.model_dump_json(indent=2) + "\n"
    if args.dry_run:
        sys.stdout.write(text)
        return 0
    (args.directory / METADATA_FILE).write_text(text)
    print(meta.weightsDigest)
    return 0
