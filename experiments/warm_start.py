"""The supervised warm start of one seed, made by the trainer itself and shared by every variant.

    python -m experiments.warm_start --config train/configs/tiny.yaml out_dir=DIR seed=S [key=value ...]

Builds `Trainer(cfg)`, whose construction writes the tiny model (`DIR/tiny_model`), the
synthetic data (`DIR/data`) and runs the warm start (`DIR/sft_model`), then stops before the
first PAPO step (with `sft.steps=0` there is no `sft_model`). The sweep copies these directories
into each variant's run directory; the trainer finds them there and reuses them instead of
rebuilding them, so every variant of a seed starts from the same weights, data and tokenizer.
"""

from __future__ import annotations

import argparse
import logging
import sys

ASSETS = ("tiny_model", "data", "sft_model")
"""The run-directory entries a warm start provides (the trainer reuses each if present)."""


def main(argv: list[str] | None = None) -> int:
    """Run the warm start; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="trainer YAML config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (out_dir=..., seed=...)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from train.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from train.trainer import Trainer

    trainer = Trainer(cfg)  # prepares the assets and runs the warm start; no PAPO step
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
