"""``python -m lit_cm3leon.prepare <subcommand> [flags]``: build tokenizers, shards, indexes.

Each subcommand lives in the module that owns it and exposes ``cli(argv) -> int``; this file
only dispatches, importing the module on demand so ``--help`` stays instant.
"""

from __future__ import annotations

import importlib
import os
import sys

SUBCOMMANDS = {
    "text-tokenizer": (
        "lit_cm3leon.tokenizer.text",
        "train the byte-level BPE, write the vocabulary",
    ),
    "tokenize": (
        "lit_cm3leon.data.pretokenize",
        "turn images (+captions) into pre-tokenized shards",
    ),
    "index": ("lit_cm3leon.retrieval.index", "embed the training split into a faiss memory bank"),
}


def usage() -> str:
    lines = ["usage: python -m lit_cm3leon.prepare <subcommand> [flags]", "", "subcommands:"]
    lines += [f"  {name:16s} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines.append("\n`python -m lit_cm3leon.prepare <subcommand> --help` shows its flags.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.cli(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
