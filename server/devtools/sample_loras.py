"""`python -m server.devtools.sample_loras DIR`: writes the demo library of small synthetic LoRA
files (kohya and PEFT layouts, SD 1.5, SD 2.x and SDXL, two with sidecar metadata) under DIR,
a server's LoRA root, and prints their paths relative to it (docs/grpcurl.md starts here)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from server.devtools.synthetic_loras import write_demo_loras


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.devtools.sample_loras")
    parser.add_argument("directory", type=Path, help="the LoRA root, e.g. ./data/loras")
    args = parser.parse_args(argv)
    for path in write_demo_loras(args.directory):
        print(path.relative_to(args.directory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
