"""Gradient noise of the perception-KL estimators at fixed policies on a fixed batch.

    python -m experiments.grad_noise --run experiments/runs/standard-full/papo-g/seed1 [--resamples 32]

For each policy of a finished run (early: its warm start `sft_model`; late: its final
`hf_model`) and one fixed batch of training prompts (their masks fixed too), the rollouts are
resampled `--resamples` times with the trainer's own rollout and log-prob code, and each time
the gradient of the perception term alone (gamma 1, no entropy, no policy term: advantages 0)
over all trainable parameters is taken with

- `sampled`: the official k3 of the sampled token against the rollout-time masked log-probs;
- `exact`: KL(pi_masked || pi_theta) over the full vocabulary, masked view without gradient.

Without the official clamps the two have the same expected gradient (the exact term is the
conditional expectation of the sampled one over the token at each position); the clamp of k3
at 10 zeroes the gradient of tokens the masked view likes far more than the policy, so the
official estimator is also biased where such tokens carry mass. One "sample" is the gradient
of one batch (by default 16 prompts x the run's rollout.n, the tiny config's mini-batch). The
script reports, per policy and estimator: |E g|, the total variance of one sample (trace of
its covariance), the noise-to-signal ratio rho = tr Var / |E g|^2 relative to the estimator's
own mean (an average of m samples has rho / m), the mean cosine of an average of m samples to
a reference gradient (the exact mean over a disjoint half of the resamples) for m = 1, 2, 4,
..., which a biased estimator cannot approach, the clamped k3's expected gradient against the
exact one computed without sampling (`clamped_k3_expected_logit_gradient`), and the time of
one update pass of each estimator. Output: `grad_noise.md`, `grad_noise.json`, `grad_noise.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ESTIMATORS = {
    "sampled": dict(estimator="sampled", masked_view="rollout_no_grad"),
    "exact": dict(estimator="exact", masked_view="current_no_grad"),
}


def _trainer_for(run: Path, policy: Path, work: Path, overrides: list[str]):
    """A Trainer on `policy` with the run's config (no warm start, no evaluation, no outputs)."""
    from train.config import load_config
    from train.trainer import Trainer

    cfg = load_config(run / "config.yaml", [
        f"out_dir={work}", f"model.path={policy}", f"data.train_path={run / 'data'}", "sft.steps=0",
        "eval.every=0", "tensorboard=false", "plot=false", "checkpoint.export_hf=false",
        *overrides])
    return Trainer(cfg)


def _perception_gradient(trainer, samples, estimator: str) -> tuple[torch.Tensor, float]:
    """Flat gradient of the perception term alone over the batch, and its update-pass seconds."""
    from papo import PAPOConfig, PAPOLoss
    from train.batching import pack, plan_micro_batches
    from train.samples import pad_stack, to_device

    module = trainer.module
    # gamma 1 alone; advantages 0 zero the policy term; "global" makes it the batch's token mean
    module.loss_fn = PAPOLoss(PAPOConfig(gamma=1.0, eta_full=0.0, eta_masked=0.0, beta=0.0,
                                         loss_scale="global", temperature=trainer.papo.temperature,
                                         **ESTIMATORS[estimator]))
    params = [p for p in module.policy.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    t = trainer.cfg.trainer
    plan = plan_micro_batches([len(s) for s in samples], max_seqs=t.micro_batch_size,
                              max_tokens=t.micro_batch_tokens)
    n_tokens = float(sum(int(s.response_ids.numel()) for s in samples))
    device = trainer.device
    t0 = time.perf_counter()
    for group in plan:
        members = [samples[i] for i in group]
        batch = pack(module.policy.model, [s.seq() for s in members]).to(device)
        T = batch.response_ids.shape[1]
        kw = dict(masked_view=ESTIMATORS[estimator]["masked_view"],
                  advantages=torch.zeros(len(members), device=device),
                  old_logp=to_device(pad_stack([s.old_logp for s in members], T), device),
                  num_micro_batches=len(plan), num_valid_tokens=n_tokens,
                  num_valid_sequences=float(len(samples)))
        if estimator == "sampled":
            kw["masked_logp"] = to_device(pad_stack([s.masked_logp for s in members], T), device)
        loss, _ = module(batch, mode="loss", **kw)
        loss.backward()
    seconds = time.perf_counter() - t0
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float().cpu()
                      for p in params])
    for p in params:
        p.grad = None
    return flat, seconds


def k3_clamped(d: torch.Tensor) -> torch.Tensor:
    """Where the official k3 clamps (|d| > 20 or k3 > 10) and so passes no gradient."""
    from papo.estimators import _MAX_K3, _MAX_LOG_RATIO

    dc = d.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return (d.abs() > _MAX_LOG_RATIO) | (dc.exp() - dc - 1.0 > _MAX_K3)


def clamped_k3_expected_logit_gradient(logp: torch.Tensor, masked_logp: torch.Tensor) -> torch.Tensor:
    """E over y ~ pi of the gradient w.r.t. the logits of the official clamped k3 at each position.

    logp, masked_logp: [N, V] full-vocabulary log-probs of the policy and of the masked view.
    The k3 of token y has gradient (1 - exp(d_y)) (e_y - pi) with d_y = masked_logp - logp,
    except where the official clamps (|d| <= 20, k3 <= 10) zero it. Without the clamps the
    expectation equals pi - pi_masked, the exact estimator's gradient; the clamps drop the
    tokens the masked view likes far more than the policy (ratio above ~13.5).
    """
    d = masked_logp - logp
    live = ~k3_clamped(d)
    pi = logp.exp()
    w = pi * torch.where(live, 1.0 - d.exp(), torch.zeros_like(d))
    return w - pi * w.sum(-1, keepdim=True)


@torch.no_grad()
def _clamp_bias_sums(trainer, samples) -> dict[str, float]:
    """Logit-space sums comparing the clamped k3's expected gradient with the exact one on the
    batch's response positions (full-vocabulary logits: a measurement, not a training path)."""
    from train.batching import pack

    module = trainer.module
    batch = pack(module.policy.model, [s.seq() for s in samples]).to(trainer.device)
    w = module.policy.lm_head.weight
    mask = batch.response_mask.bool()
    temp = trainer.papo.temperature
    logp = torch.log_softmax((module.trunk(batch)[mask] @ w.T).double() / temp, -1)
    masked = torch.log_softmax((module.trunk(batch, masked=True)[mask] @ w.T).double() / temp, -1)
    expected = clamped_k3_expected_logit_gradient(logp, masked)
    exact = logp.exp() - masked.exp()
    clamped = k3_clamped(masked - logp)
    return {"dot": float((expected * exact).sum()), "sq_sampled": float(expected.pow(2).sum()),
            "sq_exact": float(exact.pow(2).sum()), "positions": float(mask.sum()),
            "masked_mass_clamped": float((masked.exp() * clamped).sum())}


def collect(run: Path, policy: Path, *, prompts: int, resamples: int, seed: int,
            overrides: list[str] | None = None) -> dict[str, Any]:
    """Gradients of both estimators over `resamples` rollouts of one fixed batch at `policy`."""
    with tempfile.TemporaryDirectory(prefix="grad-noise-") as work:
        trainer = _trainer_for(run, policy, Path(work), list(overrides or []))
        try:
            if prompts > len(trainer.train_ds):
                raise ValueError(f"--prompts {prompts} exceeds the training set ({len(trainer.train_ds)})")
            rng = np.random.default_rng(seed)
            indices = rng.choice(len(trainer.train_ds), size=prompts, replace=False).tolist()
            grads: dict[str, list[torch.Tensor]] = {e: [] for e in ESTIMATORS}
            times: dict[str, list[float]] = {e: [] for e in ESTIMATORS}
            times.update(rollout=[], logprob=[])
            tokens = []
            bias = dict.fromkeys(("dot", "sq_sampled", "sq_exact", "positions", "masked_mass_clamped"), 0.0)
            for r in range(resamples):
                t0 = time.perf_counter()
                # the trainer's own code: fixed prompts and masks (step 0), fresh sampling seed (attempt r)
                samples = trainer._rollout_round(indices, 0, r)
                t1 = time.perf_counter()
                trainer._logprob_pass(samples)  # old and rollout-time masked log-probs
                t2 = time.perf_counter()
                times["rollout"].append(t1 - t0)
                times["logprob"].append(t2 - t1)
                tokens.append(sum(int(s.response_ids.numel()) for s in samples))
                for est in ESTIMATORS:
                    g, sec = _perception_gradient(trainer, samples, est)
                    grads[est].append(g)
                    times[est].append(sec)
                for k, v in _clamp_bias_sums(trainer, samples).items():
                    bias[k] += v
                if (r + 1) % 8 == 0 or r + 1 == resamples:
                    print(f"  {policy.name}: {r + 1}/{resamples} resamples", flush=True)
        finally:
            trainer.close()
    clamp = {"cos_expected_sampled_exact": bias["dot"] / math.sqrt(bias["sq_sampled"] * bias["sq_exact"]),
             "norm_ratio_expected_sampled_exact": math.sqrt(bias["sq_sampled"] / bias["sq_exact"]),
             "masked_mass_on_clamped_tokens": bias["masked_mass_clamped"] / bias["positions"]}
    return {"grads": {e: torch.stack(v).double() for e, v in grads.items()}, "times": times, "clamp": clamp,
            "tokens_per_batch": float(np.mean(tokens)),
            "responses_per_batch": prompts * trainer.cfg.rollout.n}


def noise_stats(grads: dict[str, torch.Tensor], *, subsets: int = 64, seed: int = 0) -> dict[str, Any]:
    """Per estimator: |E g|, tr Var of one sample, rho, and the mean cosine to the reference vs m.

    The reference is the mean exact gradient of the first half of the resamples; the cosine
    curves average random subsets of the second half (disjoint from the reference).
    """
    R = next(iter(grads.values())).shape[0]
    if R < 4:
        raise ValueError(f"need >= 4 resamples for a reference half and an evaluation half, got {R}")
    half = R // 2
    ref = grads["exact"][:half].mean(0)
    rng = np.random.default_rng(seed)
    ms = [m for m in (1, 2, 4, 8, 16, 32, 64, 128) if m <= R - half]
    out: dict[str, Any] = {"resamples": R, "reference_half": half, "m": ms, "estimators": {}}
    means = {}
    for est, G in grads.items():
        mean = G.mean(0)
        means[est] = mean
        tr_var = float(((G - mean) ** 2).sum(1).sum() / (R - 1))
        signal = max(float(mean.pow(2).sum()) - tr_var / R, 0.0)  # unbiased |E g|^2
        evals = G[half:]
        cos = []
        for m in ms:
            vals = []
            for _ in range(subsets):
                idx = rng.choice(evals.shape[0], size=m, replace=False)
                avg = evals[idx].mean(0)
                vals.append(float(torch.nn.functional.cosine_similarity(avg, ref, dim=0)))
            cos.append(float(np.mean(vals)))
        out["estimators"][est] = {
            "norm_expected": math.sqrt(signal), "trace_var": tr_var,
            "rho": tr_var / signal if signal > 0 else float("inf"), "cosine_to_reference": cos,
        }
    cos_means = torch.nn.functional.cosine_similarity(means["sampled"], means["exact"], dim=0)
    out["cos_between_means"] = float(cos_means)
    rho_ref = out["estimators"]["exact"]["rho"] / half
    out["reference_cos_to_truth"] = 1.0 / math.sqrt(1.0 + rho_ref)  # approximate ceiling of every cosine
    return out


def samples_for(cos_curve: list[float], ms: list[int], target: float = 0.9) -> str:
    for m, c in zip(ms, cos_curve):
        if c >= target:
            return str(m)
    return f"> {ms[-1]}"


def render(results: dict[str, Any]) -> str:
    """Markdown table of the measurement."""
    lines = ["# Gradient noise of the perception-KL estimators", "",
             f"Run: `{results['run']}`. Fixed batch: {results['prompts']} prompts x rollout.n = "
             f"{results['responses_per_batch']} responses (one tiny-config mini-batch), masks fixed, "
             f"rollouts resampled {results['resamples']} times per policy. Gradient of the perception "
             f"term alone over all {results['parameters']:,} trainable parameters. "
             "rho = tr Var(one sample) / |E g|^2, relative to the estimator's own mean: an average "
             "of m samples has rho / m. "
             "cos(m): mean cosine of an average of m samples to the reference (mean exact gradient of a "
             "disjoint half of the resamples; its own noise caps every cosine at about the 'ceiling'). "
             "Time: one update pass (forward + backward) of the batch; both estimators also need the "
             "no-grad log-prob pass the trainer runs anyway.", ""]
    for policy, res in results["policies"].items():
        st = res["stats"]
        ms = st["m"]
        lines += [f"## {policy} policy (`{res['path']}`)", "",
                  f"cos(mean sampled, mean exact) over all resamples: {st['cos_between_means']:.3f}; "
                  f"reference ceiling ~{st['reference_cos_to_truth']:.3f}; "
                  f"{res['tokens_per_batch']:.0f} response tokens per batch on average.", "",
                  "Expected gradient of the official clamped k3 (exact expectation over the sampled token, "
                  "in logit space, on the same response positions) against the exact estimator's: cosine "
                  f"{res['clamp']['cos_expected_sampled_exact']:.3f}, norm ratio "
                  f"{res['clamp']['norm_ratio_expected_sampled_exact']:.3f}; the masked view puts "
                  f"{100 * res['clamp']['masked_mass_on_clamped_tokens']:.1f}% of its mass per position on "
                  "tokens whose k3 the clamp (<= 10) cuts. Without the clamp both would be 1.000.", "",
                  "| estimator | \\|E g\\| | tr Var (one sample) | rho | "
                  + " | ".join(f"cos({m})" for m in ms) + " | samples for cos >= 0.9 | update pass (ms) |",
                  "|---" * (6 + len(ms)) + "|"]
        for est, e in st["estimators"].items():
            t = res["times"][est]
            lines.append(f"| {est} | {e['norm_expected']:.3e} | {e['trace_var']:.3e} | {e['rho']:.2f} | "
                         + " | ".join(f"{c:.3f}" for c in e["cosine_to_reference"])
                         + f" | {samples_for(e['cosine_to_reference'], ms)} | {1000 * t:.0f} |")
        r_s, r_e = st["estimators"]["sampled"]["rho"], st["estimators"]["exact"]["rho"]
        t = res["times"]
        lines += ["", f"Noise ratio rho sampled / exact: {r_s / r_e:.1f}x (relative to each one's own "
                      "mean; the sampled estimator's mean is also off the exact gradient, see its "
                      f"cosines). Rollout {1000 * t['rollout']:.0f} ms and log-prob pass "
                      f"{1000 * t['logprob']:.0f} ms per batch (median).", ""]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for policy, res in results["policies"].items():
        st = res["stats"]
        for est, e in st["estimators"].items():
            style = "-" if est == "exact" else "--"
            a1.plot(st["m"], e["cosine_to_reference"], style, marker="o", label=f"{policy}, {est}")
            a2.plot(st["m"], [e["rho"] / m for m in st["m"]], style, marker="o", label=f"{policy}, {est}")
    a1.set_xscale("log", base=2)
    a1.set_xlabel("samples averaged (batches of rollouts)")
    a1.set_ylabel("mean cosine to the reference (mean exact gradient)")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    a2.set_xscale("log", base=2)
    a2.set_yscale("log")
    a2.set_xlabel("samples averaged (batches of rollouts)")
    a2.set_ylabel("rho / m: tr Var / |E g|^2 (own mean)")
    a2.grid(alpha=0.3)
    fig.suptitle("Perception-term gradient: sampled k3 vs exact estimator", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """CLI: measure, then write grad_noise.{md,json,png} into --out."""
    from experiments.variants import ROOT

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True,
                        help="a finished run directory (with sft_model, hf_model, data)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts in the fixed batch")
    parser.add_argument("--resamples", type=int, default=32, help="rollout resamples per policy (>= 4)")
    parser.add_argument("--seed", type=int, default=0, help="which prompts form the batch")
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "grad_noise"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="trainer override for the measurement (e.g. rollout.n=2)")
    args = parser.parse_args(argv)
    if args.resamples < 4:
        parser.error(f"--resamples must be >= 4, got {args.resamples}")
    if args.prompts < 1:
        parser.error(f"--prompts must be >= 1, got {args.prompts}")
    run = Path(args.run)
    policies = {"early": run / "sft_model", "late": run / "hf_model"}
    for name, p in policies.items():
        if not (p / "config.json").exists():
            parser.error(f"--run {run}: no {name} policy at {p} (a finished run of the sweep has both)")
    results: dict[str, Any] = {"run": str(run), "prompts": args.prompts, "resamples": args.resamples,
                               "policies": {}}
    for name, path in policies.items():
        t0 = time.perf_counter()
        data = collect(run, path, prompts=args.prompts, resamples=args.resamples, seed=args.seed,
                       overrides=args.set)
        results["parameters"] = int(data["grads"]["exact"].shape[1])
        results["responses_per_batch"] = data["responses_per_batch"]
        results["policies"][name] = {
            "path": str(path), "stats": noise_stats(data["grads"]),
            "times": {k: float(np.median(v)) for k, v in data["times"].items()},
            "tokens_per_batch": data["tokens_per_batch"], "wall_s": time.perf_counter() - t0,
            "clamp": data["clamp"],
        }
        print(f"{name}: {args.resamples} resamples in {time.perf_counter() - t0:.0f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grad_noise.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "grad_noise.md").write_text(render(results))
    plot(results, out / "grad_noise.png")
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
