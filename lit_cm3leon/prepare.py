"""``python -m lit_cm3leon.prepare <subcommand> [flags]``: build artifacts before training.

Each subcommand is owned by a module exposing ``cli(argv) -> int``; this file only dispatches.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "text-tokenizer": "lit_cm3leon.tokenizer.text",
    "tokenize": "lit_cm3leon.data.pretokenize",
    "index": "lit_cm3leon.retrieval.index",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        print(f"usage: python -m lit_cm3leon.prepare {{{'|'.join(SUBCOMMANDS)}}} [flags]", file=sys.stderr)
        return 2
    return importlib.import_module(SUBCOMMANDS[argv[0]]).cli(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
