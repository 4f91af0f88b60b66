"""``raptorz encoders``: the named encoders, their tokens, input and weights."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``encoders`` verb."""
    parser = subparsers.add_parser(
        "encoders", help="list the named encoders (--encoder NAME)",
        description="List every named encoder: its token width (the projector's --dim), "
        "tokens per slice, input size, the weights layouts --weights accepts and where "
        "to obtain the weights. Any other timm model name works too.")
    parser.add_argument("--tests", action="store_true",
                        help="also list the tiny test models (no published weights)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def _tokens(row: dict[str, Any]) -> str:
    if row["output"] == "feature_map":
        return f"{row['tokens']} grid"
    prefix = row["prefix_tokens"]
    kinds = "cls" if prefix == 1 else f"cls+{prefix - 1}reg"
    return f"{row['tokens']} ({kinds})"


def run(args: argparse.Namespace) -> int:
    """Print the table (or JSON) of :func:`raptorz.list_encoders`."""
    from raptorz import list_encoders

    rows = [info.as_dict() for info in list_encoders(tests=args.tests)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("name", "width", "tokens", "input", "params", "paper", "layouts")
    table = [header] + [(
        r["name"], str(r["width"]), _tokens(r), f"{r['img_size']}/{r['patch_size']}",
        f"{r['parameters'] / 1e6:.0f}M" if r["parameters"] >= 1e6 else
        f"{r['parameters'] / 1e3:.0f}k",
        f"{r['paper_auroc']:.3f}" if r["paper_auroc"] else "-", ",".join(r["layouts"]),
    ) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
              .rstrip())
    print("\ninput: image side / patch side in px; paper: mean AUROC over the six 3D MedMNIST "
          "sets, Raptor Table A.1 (K=100)\n\nwhere to get the weights (--weights FILE or "
          "FOLDER; or the Hugging Face cache):")
    for r in rows:
        if r["weights_from"]:
            print(f"  {r['name']}: {r['weights_from']}")
    return 0
