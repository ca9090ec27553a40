"""Entry point: `deepspeed train/run.py --config train/configs/tiny.yaml [key=value ...]`.

Also runs as a plain process (`python train/run.py ...` or `python -m train.run ...`),
which creates a one-process group. Overrides use dotted keys, e.g.
`optim.lr=1e-6 papo.gamma=0.02 trainer.zero_stage=3`. `--print-config` prints the
resolved config with every field's documentation and exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# `deepspeed train/run.py` runs this file as a script: make the repository importable.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from train.config import ConfigError, describe, load_config  # noqa: E402
from train.trainer import Trainer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `--config FILE`, `key=value` overrides and the launcher's `--local_rank`."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).parent / "configs" / "tiny.yaml"),
                        help="YAML config (default: train/configs/tiny.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-6")
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def main(argv: list[str] | None = None) -> int:
    """Load the config, train, evaluate, export; returns the process exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print("\n".join(describe(cfg)))
        return 0
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
