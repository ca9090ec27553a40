"""Evaluation: avg@k accuracy (docs/algorithm.md "Evaluation") per dataset and overall.

Protocol: sample k responses per question (temperature 1.0, top_p 1.0 by
default, images resized to PAPO-Eval's [32*32, 768*768] pixels), grade the last
`\\boxed{}` with the training grader (no format term), average correctness per
question, then over questions. `--black-images` replaces every image with a
black one of the same size: a policy that reads the image should then fall to
the blind baseline (the synthetic task's question-aware majority rate).

    python -m train.eval --model runs/tiny/hf_model --data runs/tiny/data --split validation --k 4
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from papo.rewards import AnswerGrader, compute_score
from train.batching import encode_prompt
from train.data import load_dataset_for
from train.policy import load_policy
from train.rollout import HFRolloutEngine, RolloutEngine, SamplingParams


def evaluate_dataset(engine: RolloutEngine, processor, dataset, *, k: int, temperature: float = 1.0,
                     top_p: float = 1.0, max_new_tokens: int = 2048, min_pixels: int = 32 * 32,
                     max_pixels: int = 768 * 768, limit: int = 0, seed: int = 0, black_images: bool = False,
                     grader=None, rank: int = 0, world: int = 1, batch_questions: int = 64) -> dict[str, Any]:
    """avg@k of `engine` on a VisionRLDataset; ranks split the questions and all-reduce.

    With several ranks every rank calls `engine.generate` the same number of times (possibly
    with no prompts), however unevenly the questions split.

    Returns {"avg@k": float, "format": float, "questions": int, "by_category": {name: avg@k}}.
    """
    n = min(limit, len(dataset)) if limit else len(dataset)
    mine = list(range(rank, n, world))
    per_cat: dict[str, list[float]] = defaultdict(list)
    acc_sum = fmt_sum = 0.0
    # Every rank makes the same number of `generate` calls, sized by the largest shard: an
    # engine may run collectives inside (ZeRO-3 gathers the weights once per call), and with
    # uneven shards (e.g. 257 questions on 4 ranks) a rank with fewer chunks would leave the
    # others waiting in a collective it never joins. A rank past its shard sends no prompts.
    largest_shard = -(-n // world)
    for start in range(0, largest_shard if world > 1 else len(mine), batch_questions):
        chunk = mine[start: start + batch_questions]
        items = [dataset[i] for i in chunk]
        encs = []
        for it in items:
            images = it["images"]
            if black_images:
                images = [Image.new("RGB", im.size, (0, 0, 0)) for im in images]
            encs.append(encode_prompt(processor, it["prompt"], images, min_pixels=min_pixels,
                                      max_pixels=max_pixels))
        params = SamplingParams(n=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                seed=seed * 7_919 + start + 1)
        completions = engine.generate(encs, params)
        if not items:
            continue
        texts = [processor.tokenizer.decode(c.token_ids, skip_special_tokens=True)
                 for comps in completions for c in comps]
        truths = [it["answer"] for it in items for _ in range(k)]
        scores = compute_score(texts, truths, grader=grader)
        for q, it in enumerate(items):
            s = scores[q * k:(q + 1) * k]
            acc = sum(x["accuracy"] for x in s) / k
            acc_sum += acc
            fmt_sum += sum(x["format"] for x in s) / k
            per_cat[it.get("category") or "all"].append(acc)
    totals = torch.tensor([acc_sum, fmt_sum, float(len(mine))], dtype=torch.float64)
    cats: dict[str, list[float]] = dict(per_cat)
    if torch.distributed.is_initialized() and world > 1:
        torch.distributed.all_reduce(totals)
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, cats)
        cats = defaultdict(list)
        for g in gathered:
            for name, v in g.items():
                cats[name] += v
    count = max(totals[2].item(), 1.0)
    return {
        f"avg@{k}": totals[0].item() / count,
        "format": totals[1].item() / count,
        "questions": int(totals[2].item()),
        "by_category": {name: sum(v) / len(v) for name, v in sorted(cats.items()) if v},
    }


def to_markdown(results: dict[str, dict[str, Any]], k: int) -> str:
    """A markdown table: one row per dataset plus the overall mean (mean of dataset scores)."""
    lines = [f"| dataset | questions | avg@{k} (%) | format (%) |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['questions']} | {100 * r[f'avg@{k}']:.2f} | {100 * r['format']:.2f} |")
    if results:
        overall = sum(r[f"avg@{k}"] for r in results.values()) / len(results)
        questions = sum(r["questions"] for r in results.values())
        lines.append(f"| **overall** | {questions} | {100 * overall:.2f} | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """CLI: evaluate a local Qwen2.5-VL checkpoint on one or more ViRL39K-format datasets."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local model directory (HF format)")
    parser.add_argument("--data", required=True, action="append", help="dataset path (repeatable)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--k", type=int, default=8, help="samples per question (avg@k)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=2048)
    parser.add_argument("--min-pixels", type=int, default=32 * 32)
    parser.add_argument("--max-pixels", type=int, default=768 * 768)
    parser.add_argument("--max-prompt-length", type=int, default=9216, help="PAPO-Eval cutoff_len")
    parser.add_argument("--limit", type=int, default=0, help="first N questions per dataset (0: all)")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences generated together")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--black-images", action="store_true", help="replace every image by a black one")
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    parser.add_argument("--num-threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default; 1 is fastest for tiny models)")
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    torch.manual_seed(args.seed)
    model, processor = load_policy(args.model, dtype=torch.float32, attn_implementation="sdpa")
    if torch.cuda.is_available():
        model = model.cuda()
    engine = HFRolloutEngine(model, processor.tokenizer, batch_size=args.batch_size)
    results = {}
    with AnswerGrader() as grader:
        for path in args.data:
            ds = load_dataset_for(path, args.split, processor, min_pixels=args.min_pixels,
                                  max_pixels=args.max_pixels, max_prompt_length=args.max_prompt_length)
            results[Path(path).name] = evaluate_dataset(
                engine, processor, ds, k=args.k, temperature=args.temperature, top_p=args.top_p,
                max_new_tokens=args.max_new_tokens, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                limit=args.limit, seed=args.seed, black_images=args.black_images, grader=grader)
    md = to_markdown(results, args.k)
    print(md)
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(results, indent=2) + "\n")
        Path(args.out + ".md").write_text(md)


if __name__ == "__main__":
    main()
