"""Mutation audit: plant known bugs one at a time and check that the tests meant to catch them fail.

A developer tool, not part of the test suite (it runs the named tests once per mutation: about
ten minutes on a 2-core machine). Each mutation replaces one or more snippets of the
repository's files (each snippet must occur exactly once) in a scratch copy, runs the tests it
names there, and counts as caught when they fail. Run it after changing a test or the code a
mutation edits:

    python scripts/mutation_audit.py                  # every mutation, then a table
    python scripts/mutation_audit.py --list           # names and what each one plants
    python scripts/mutation_audit.py --only zero3-gradient-scale,masking-no-blackening
    python scripts/mutation_audit.py --clean          # first check the named tests pass unmutated
    python scripts/mutation_audit.py --check          # only check that every snippet still matches

Exit status 0 when every mutation was caught. A snippet that no longer matches the code is
reported as "stale" (the mutation must be updated with the code it plants a bug in).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    edits: tuple[tuple[str, str, str], ...]  # (file, original snippet, replacement)
    tests: tuple[str, ...]  # pytest arguments: node ids, files, "-k", expressions


def M(name, what, edits, *tests):
    return Mutation(name, what, tuple(edits), tuple(tests))


TRITON = "tests/test_triton_kernels.py"
CONTRACT = "tests/test_backend_contract.py"
CONFIGS = "tests/test_train_configs.py"
LOOP = "papo/integrations/torch_loop.py"

MUTATIONS = [
    # ------------------------------------------------------------------ kernels and backends
    M("kernels-import-error", "a wrong name imported inside papo_kernels.kernels",
      [("papo_kernels/kernels/__init__.py",
        "from papo_kernels.kernels._config import LaunchConfig, override_configs",
        "from papo_kernels.kernels._config import LaunchConfig, override_config")],
      "tests/test_backends.py", TRITON, "-k", "unknown_strategy or the_triton_kernels_import"),
    M("backends-import-errors-are-unavailable", "every ImportError means 'unavailable' (the old rule)",
      [("papo_kernels/_backends.py",
        "        if not _missing_optional(exc, module, optional):\n            raise\n", "")],
      "tests/test_backends.py"),
    M("triton-bf16-dh-bias", "a 1% bias in dh_a of the Triton backend's bf16 gradients",
      [("papo_kernels/kernels/__init__.py",
        "        weight_grad_acc += acc.to(weight_grad_acc.dtype)\n    return dh_a, dh_b",
        "        weight_grad_acc += acc.to(weight_grad_acc.dtype)\n"
        "    if dh_a is not None and dh_a.dtype == torch.bfloat16:\n        dh_a.mul_(1.01)\n"
        "    return dh_a, dh_b")],
      CONTRACT, "-k", "triton and bfloat16 and 37x40x300 and (token_stats or two_view_stats) and 1.0"),
    M("triton-constant-view-b-in-dw", "the Triton backend adds a constant view b's term into dW",
      [("papo_kernels/kernels/__init__.py", "    b_in_dw = two and not hidden_b_is_constant\n",
        "    b_in_dw = two\n")],
      CONTRACT, "-k", "triton and two_view_stats and b_const and 37x40x300"),
    M("cpp-fused-view-b-not-in-dw", "the cpp workspace loop of the fused calls drops a live view b's dW term",
      [("papo_kernels/extension.py", "    b_in_dw = two and not hidden_b_is_constant\n",
        "    b_in_dw = False\n")],
      CONTRACT, "-k", "cpp-workspace and fused_two_view_loss and b_live"),
    M("fused-loss-sweeps-without-grad", "the gradient sweep runs when no input requires grad",
      [("papo_kernels/autograd.py", "need_any = need_a or need_b or need_w", "need_any = True"),
       ("papo_kernels/autograd.py", "dh_a = torch.zeros_like(hidden_a) if need_a else None",
        "dh_a = torch.zeros_like(hidden_a)")],
      f"{TRITON}::test_fused_loss_without_grad_launches_no_dz_kernel"),
    # ------------------------------------------------------------------ papo/
    M("torch-loop-gradient-sign", "train_step ascends the loss",
      [(LOOP, "        out.loss.backward()", "        (-out.loss).backward()")],
      "tests/test_papo_integration.py"),
    M("torch-loop-rollout-masked-view", "rollout_log_probs takes the masked log-probs from the original view",
      [(LOOP, "two_view_stats(hidden_fn(batch, False), hidden_fn(batch, True),",
        "two_view_stats(hidden_fn(batch, False), hidden_fn(batch, False),")],
      "tests/test_papo_integration.py"),
    M("torch-loop-step-masked-view", "train_step passes the original view as the masked hidden states",
      [(LOOP, "masked_hidden = hidden_fn(mb, True)", "masked_hidden = hidden_fn(mb, False)")],
      "tests/test_papo_integration.py"),
    M("torch-loop-masked-logp", "train_step passes the old log-probs as the masked log-probs",
      [(LOOP, 'masked_logp=mb.get("masked_logp") if', 'masked_logp=mb.get("old_logp") if')],
      "tests/test_papo_integration.py"),
    M("masking-no-blackening", "mask_images blackens nothing",
      [("papo/masking.py", "    arr[pixel_mask] = 0\n", "")],
      "tests/test_papo_masking.py", "-k", "modes_are_kept"),
    M("grader-timeout-uncounted", "a deadline that fires is not counted as a timeout",
      [("papo/rewards.py", "                        stats.timeouts += 1\n", "")],
      "tests/test_reliability_faults.py::test_grader_worker_that_dies_or_hangs_changes_no_grade"),
    # ------------------------------------------------------------------ benchmarks
    M("bench-cpp-falls-back-to-torch", "the cpp provider silently runs the torch backend when cpp is missing",
      [("benchmarks/providers.py", "raise Unavailable(str(exc)) from None\n", "pass\n"),
       ("benchmarks/providers.py", "kw = dict(backend=backend, strategy=strategy)",
        'kw = dict(backend="torch" if backend == "cpp" else backend, strategy=strategy)')],
      "tests/test_benchmarks_loss.py::test_unavailable_providers_are_cells_not_crashes"),
    M("step-benchmark-infinite-loss", "the step benchmark returns an infinite loss",
      [("benchmarks/step.py", "        return float(out.loss.detach())", '        return float("inf")')],
      "tests/test_benchmarks_step.py::test_step_benchmark"),
    # ------------------------------------------------------------------ trainer
    M("trainer-infinite-metric", "the trainer logs an infinite grad_norm",
      [("train/update.py", 'out["grad_norm"] = float(np.mean(grad_norms)) if grad_norms else 0.0',
        'out["grad_norm"] = float("inf")')],
      "tests/test_train_trainer.py::test_smoke_metrics_checkpoints_and_on_policy_ratio"),
    M("zero3-gradient-scale", "ZeRO-3 gradients twice as large as ZeRO-0's",
      [("train/update.py", "        self.engine.backward(loss, scale_wrt_gas=False)",
        "        self.engine.backward(loss * 2 if self.zero3 else loss, scale_wrt_gas=False)")],
      "tests/test_train_trainer.py::test_zero3_matches_zero0[False]"),
    M("reference-is-the-policy", "the reference model is the trained policy itself",
      [("train/trainer.py", "self.ref_model, self.ref_sharded = build_reference(ref_dir, cfg, "
        "dtype=dtype, device=self.device,\n" + " " * 63 + "world=self.world)",
        "self.ref_model, self.ref_sharded = self.engine, False")],
      CONFIGS, "-k", "reference and fp32"),
    M("reference-in-fp32-under-bf16", "the reference model computes in fp32 while the policy runs bf16",
      [("train/engine.py", "ref, _ = load_policy(path, dtype=dtype,",
        "ref, _ = load_policy(path, dtype=torch.float32,")],
      CONFIGS, "-k", "reference and bf16"),
    M("reference-not-warm-started", "the reference stays the random initial policy after the warm start",
      [("train/trainer.py", 'ref_dir = self.out / "sft_model" if cfg.sft.steps > 0 else model_dir',
        "ref_dir = model_dir")],
      CONFIGS, "-k", "warm_start"),
    M("online-filter-keeps-everything", "the DAPO online filter keeps every group",
      [("train/online_filter.py", "passing = [i for i in range(len(groups)) if bool(keep[i * n])]",
        "passing = list(range(len(groups)))")],
      CONFIGS, "-k", "online_filter"),
    M("exact-masked-pass-sees-the-original-image", "the trainer's masked pass uses the original pixels",
      [("train/policy.py", "                masked_hidden = self.trunk(batch, masked=True)",
        "                masked_hidden = self.trunk(batch, masked=False)")],
      CONFIGS, "-k", "exact_estimator"),
    M("exact-masked-views-swapped", "current_no_grad runs the masked pass with grad, live without",
      [("train/policy.py", 'ctx = torch.no_grad() if masked_view == "current_no_grad" else',
        'ctx = torch.no_grad() if masked_view == "live" else')],
      CONFIGS, "-k", "exact_estimator"),
    M("sft-ascends-the-nll", "the warm start maximizes the NLL",
      [("train/sft.py", "loss = -(st.logp * batch.response_mask).sum() / n_tokens",
        "loss = (st.logp * batch.response_mask).sum() / n_tokens")],
      CONFIGS, "-k", "warm_start"),
    M("sft-result-not-loaded", "PAPO starts from the initial model instead of the warm-started one",
      [("train/trainer.py", "        policy, _ = load_policy(sft_dir, dtype=torch.float32,",
        '        policy, _ = load_policy(self.out / "tiny_model", dtype=torch.float32,')],
      CONFIGS, "-k", "warm_start"),
    M("bf16-disabled", "model.dtype=bfloat16 trains in fp32",
      [("train/engine.py", '"enabled": dtype == torch.bfloat16}', '"enabled": False}')],
      "tests/test_train_bf16.py::test_bf16_run[False-0]"),
    M("lora-not-applied", "model.lora.rank trains the full model",
      [("train/policy.py", "    if adapters and m.lora.rank:", "    if False:")],
      "tests/test_train_lora.py::test_lora_trains_adapters_only_and_export_merges"),
    # ------------------------------------------------------------------ examples and the suite itself
    M("quickstart-wrong-kl-direction", "the quickstart checks the KL against the other direction",
      [("examples/quickstart.py", "(lb.exp() * (lb - la)).sum(-1)", "(la.exp() * (la - lb)).sum(-1)")],
      "tests/test_examples.py"),
    M("ci-skips-allowed", "skips pass under CI=true",
      [("tests/conftest.py", '    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")',
        "    return False")],
      "tests/test_ci_policy.py"),
]


def _copy_repo(dest: Path) -> None:
    """Tracked and untracked (not ignored) files of the working tree, and the compiled extension
    where it is built (git ignores it; without it the cpp backend's tests skip and its mutations
    count as missed)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for lib in (ROOT / "papo_kernels").glob("_C*.so"):
        shutil.copy2(lib, dest / "papo_kernels" / lib.name)


def _apply(tree: Path, mutation: Mutation) -> dict[Path, str] | str:
    """Apply the edits; returns the original texts, or why the mutation is stale."""
    originals: dict[Path, str] = {}
    for rel, old, new in mutation.edits:
        path = tree / rel
        current = path.read_text()
        originals.setdefault(path, current)
        if current.count(old) != 1:
            for p, text in originals.items():
                p.write_text(text)
            return f"{rel}: snippet found {current.count(old)} times"
        path.write_text(current.replace(old, new))
    return originals


def _run_tests(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    env.pop("CI", None)  # a mutation must be caught by a failing test, not by the CI skip rule
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timed out", time.monotonic() - start
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode, lines[-1] if lines else "", time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated mutation names")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--clean", action="store_true", help="first run each mutation's tests unmutated")
    parser.add_argument("--check", action="store_true", help="only check that every snippet still matches")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per test run")
    args = parser.parse_args(argv)
    chosen = MUTATIONS
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {m.name for m in MUTATIONS}
        if unknown:
            parser.error(f"unknown mutation(s): {sorted(unknown)}")
        chosen = [m for m in MUTATIONS if m.name in names]
    if args.list:
        for m in chosen:
            print(f"{m.name:42} {m.what}\n{'':42} tests: {' '.join(m.tests)}")
        return 0
    if args.check:
        stale = [(m.name, rel, (ROOT / rel).read_text().count(old)) for m in chosen for rel, old, _ in m.edits
                 if (ROOT / rel).read_text().count(old) != 1]
        for name, rel, count in stale:
            print(f"{name}: {rel}: snippet found {count} times")
        print(f"{len(chosen) - len({n for n, _, _ in stale})}/{len(chosen)} mutations apply")
        return 1 if stale else 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="papo-mutation-") as tmp:
        tree = Path(tmp)
        _copy_repo(tree)
        for m in chosen:
            if args.clean:
                rc, last, secs = _run_tests(tree, m.tests, args.timeout)
                if rc != 0:
                    rows.append((m, "FAILS UNMUTATED", last, secs))
                    print(f"{m.name}: the tests fail without the mutation: {last}", flush=True)
                    continue
            applied = _apply(tree, m)
            if isinstance(applied, str):
                rows.append((m, "stale", applied, 0.0))
                print(f"{m.name}: stale ({applied})", flush=True)
                continue
            try:
                rc, last, secs = _run_tests(tree, m.tests, args.timeout)
            finally:
                for path, text in applied.items():
                    path.write_text(text)
            verdict = "caught" if rc not in (0, 5) else ("MISSED" if rc == 0 else "no tests ran")
            rows.append((m, verdict, last, secs))
            print(f"{m.name}: {verdict} ({secs:.0f} s) {last}", flush=True)
    print()
    print("| mutation | planted bug | tests | result | time |")
    print("|---|---|---|---|---|")
    for m, verdict, last, secs in rows:
        tests = " ".join(t.replace("tests/", "") for t in m.tests)
        print(f"| {m.name} | {m.what} | `{tests}` | {verdict} | {secs:.0f} s |")
    caught = sum(v == "caught" for _, v, _, _ in rows)
    print(f"\n{caught}/{len(rows)} caught")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
