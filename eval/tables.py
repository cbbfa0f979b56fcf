"""The paper's Table 1 (zero-shot FID) and Table 2 (captioning / VQA after SFT), our rows beside
the paper's figures, labelled, as markdown.

    python eval/tables.py outputs/eval/*/metrics.json [--out outputs/eval/tables.md]

Each metrics.json goes where its keys say: `fid` -> Table 1; `CIDEr` or `overall` -> Table 2
(column chosen by its `protocol`: coco, vqa2, vizwiz, okvqa, or a column of its own).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python eval/tables.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_cm3leon.evaluation.metrics_io import InputError, read_metrics
from lit_cm3leon.evaluation.paper import table1_markdown, table2_markdown


def build(paths: list[str]) -> str:
    records = [read_metrics(p) for p in paths]
    fid = [r for r in records if "fid" in r]
    text = [r for r in records if "CIDEr" in r or "overall" in r]
    return table1_markdown(fid) + "\n\n" + table2_markdown(text) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("metrics", nargs="*", help="metrics.json files written by eval/*.py")
    p.add_argument("--out", default=None, help="also write the markdown here")
    args = p.parse_args(argv)
    try:
        md = build(args.metrics)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(md, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(md, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
