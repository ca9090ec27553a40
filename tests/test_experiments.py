"""experiments/: the statistics on known answers, the report on fixed JSONL, the sweep end to end
and the gradient-noise measurement."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments import stats
from experiments.report import main as report_main
from experiments.report import render_markdown
from tests._tiny_runs import child_env

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_t_quantile_matches_the_table(df, expected):
    assert stats.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert stats.t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-4)
    assert stats.t_cdf(expected, df) == pytest.approx(0.975, abs=1e-5)
    assert stats.t_cdf(-expected, df) == pytest.approx(0.025, abs=1e-5)


def test_t_interval_known_answer():
    iv = stats.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)
    assert (iv.n, iv.mean) == (5, 3.0)
    assert iv.sd == pytest.approx(math.sqrt(2.5))
    assert (iv.lo, iv.hi) == (pytest.approx(3 - half, abs=1e-5), pytest.approx(3 + half, abs=1e-5))
    assert iv.verdict == "helps"
    assert stats.t_interval([-1.0, -1.5, -1.2]).verdict == "hurts"
    assert stats.t_interval([-1.0, -2.0, -3.0]).verdict == "no detectable difference"  # [-4.48, +0.48]
    assert stats.t_interval([-1.0, 1.0, 0.5]).verdict == "no detectable difference"
    assert stats.t_interval([0.3]).verdict == "too few seeds"


def test_pairing_by_seed():
    # a good and a bad warm start: seeds differ by 40 points, the variant is +5 on each one;
    # paired, the interval excludes 0; seed 4 (baseline only) is left out
    variant = {1: 0.50, 2: 0.91, 3: 0.70}
    baseline = {1: 0.45, 2: 0.86, 3: 0.65, 4: 0.99}
    assert stats.paired_differences(variant, baseline) == pytest.approx([0.05, 0.05, 0.05])
    iv = stats.paired_interval({1: 0.50, 2: 0.92, 3: 0.70}, baseline)
    assert iv.n == 3 and iv.verdict == "helps" and iv.mean == pytest.approx(0.0533333)
    assert stats.paired_interval({7: 0.5}, baseline) is None


@pytest.mark.parametrize("kl_last, evals, collapsed", [
    (0.11, [0.30, 0.45, 0.39], True),     # KL x11, 6 points below the peak
    (0.099, [0.30, 0.45, 0.39], False),   # KL x9.9
    (0.11, [0.30, 0.45, 0.401], False),   # 4.9 points below the peak
    (0.11, [0.30, 0.35, 0.45], False),    # the final evaluation is the peak
])
def test_collapse_rule(kl_last, evals, collapsed):
    kl = [0.01] * 5 + [0.05] * 5 + [kl_last] * 5
    c = stats.collapse(kl, evals)
    assert c.kl_ratio == pytest.approx(kl_last / 0.01)
    # a KL that blew up and fell back to 0 (outputs no longer depend on the image) still rose
    c = stats.collapse([0.01] * 5 + [kl_last] * 5 + [0.0] * 5, evals)
    assert c.kl_ratio == pytest.approx(kl_last / 0.01) and c.kl_final == 0.0
    assert c.collapsed is collapsed
    assert c.eval_drop_points == pytest.approx(100 * (max(evals) - evals[-1]))
    assert c.collapsed is collapsed


# ------------------------------------------------------------------------------------ report


def _row(variant, seed, avg, *, black=0.05, cat=None, step_s=1.0, kl_ratio=1.5, collapsed=False, drop=0.0):
    return {"variant": variant, "seed": seed, "k": 4, "questions": 256, "avg": avg, "format": 0.9,
            "initial_avg": 0.30 + 0.01 * seed,
            "by_category": cat or {"count": avg - 0.1, "colour": avg + 0.1}, "black_avg": black,
            "black_by_category": {"count": black, "colour": black}, "blind_baseline": 0.3125,
            "real_to_black_drop": avg - black, "wall_s": 300.0, "attempts": 1, "step_s_mean": step_s,
            "cpu_s": 240.0, "update_s_mean": step_s / 2, "kl_ratio": kl_ratio, "collapsed": collapsed,
            "eval_drop_points": drop}


FIXED_ROWS = [
    _row("grpo", 1, 0.40), _row("grpo", 2, 0.45), _row("grpo", 3, 0.50),
    # +2, +3, +2 points: mean +2.33, sd 0.577, t(2) 4.3027 -> [+0.90, +3.77]: helps
    _row("papo-g", 1, 0.42), _row("papo-g", 2, 0.48), _row("papo-g", 3, 0.52),
    # -2, +2, -1: mean -0.33, sd 2.08 -> [-5.50, +4.84]: no detectable difference
    _row("papo-g-exact", 1, 0.38, step_s=1.2), _row("papo-g-exact", 2, 0.47, step_s=1.25),
    _row("papo-g-exact", 3, 0.49, step_s=1.3),
    _row("g0.2-e0", 1, 0.30, kl_ratio=25.0, collapsed=True, drop=8.0),
    _row("g0.2-e0", 2, 0.44, kl_ratio=3.0, drop=1.0),
]


def test_tables_from_fixed_jsonl(tmp_path, capsys):
    md = render_markdown(FIXED_ROWS)
    lines = md.splitlines()

    def row(prefix):
        found = [x for x in lines if x.startswith(prefix)]
        assert found, (prefix, md)
        return found[0]

    assert row("| grpo | 3 |") == \
        "| grpo | 3 | 45.0 ± 5.0 | - | - | 5.0 ± 0.0 | 40.0 ± 5.0 | 5.0 | 4.0 | 1.00 |"
    assert "| +2.3 [+0.9, +3.8] | helps |" in row("| papo-g | 3 |")
    assert "| -0.3 [-5.5, +4.8] | no detectable difference |" in row("| papo-g-exact | 3 |")
    # exact - sampled: -4, -1, -3 points: mean -2.67, sd 1.53 -> [-6.46, +1.13];
    # step time +0.20, +0.25, +0.30 s: mean 0.25, sd 0.05 -> [+0.126, +0.374]
    assert "| held-out avg@4 (points) | -2.7 [-6.5, +1.1] | no detectable difference |" in md
    assert "| PAPO step time (s) | +0.250 [+0.126, +0.374] | exact is slower |" in md
    # per category: count is avg - 10 points, so its differences equal the overall ones
    assert "| papo-g | count | 37.3 ± 5.0 | +2.3 [+0.9, +3.8] | helps |" in md
    # the grid: collapse counted per run, the paired interval over the 2 shared seeds
    assert row("| 0.2 | 0 | g0.2-e0 | 2 |").endswith("| 14.00 | 4.5 | 90.0 ± 0.0 | 1/2 |")
    assert "seed 1: 31.0; seed 2: 32.0; seed 3: 33.0." in md

    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in FIXED_ROWS))
    assert report_main(["--from-jsonl", str(path)]) == 0
    assert capsys.readouterr().out == md


def test_tables_pair_by_seed_not_by_position():
    # grpo lacks seed 1: papo-g pairs on seeds 2 and 3 only (+3, +2 points; t(1) = 12.706)
    rows = [r for r in FIXED_ROWS if (r["variant"], r["seed"]) != ("grpo", 1)]
    md = render_markdown(rows)
    assert "| papo-g | 3 | 47.3 ± 5.0 | +2.5 [-3.9, +8.9] | no detectable difference |" in md
    assert render_markdown(rows[::-1]) == md


def test_step0_mismatch_is_flagged():
    rows = [_row("grpo", 1, 0.4), dict(_row("papo-g", 1, 0.45), initial_avg=0.5)]
    assert "(differs!)" in render_markdown(rows)


# ------------------------------------------------------------------------------------ the sweep

TINY_SET = [
    "data.synthetic.n_train=32", "data.synthetic.n_val=8", "trainer.rollout_batch_size=8",
    "trainer.mini_batch_size=8", "trainer.micro_batch_size=4", "rollout.n=2", "data.max_response_length=6",
    "eval.every=2", "eval.k=1", "sft.steps=2", "sft.batch_size=4", "tensorboard=false", "plot=false",
    "trainer.max_steps=2", "checkpoint.save_every=0",
]


def _sweep(root: Path, results: Path, *extra: str, sets=TINY_SET) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "experiments.sweep", "--root", str(root), "--results", str(results),
           "--variants", "grpo,papo-g-exact", "--seeds", "1", "--grid-seeds", "0", "--jobs", "2",
           *[f"--set={s}" for s in sets], *extra]
    return subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One tiny sweep: 1 seed, 2 variants, 2 PAPO steps (with the HF export, for grad_noise)."""
    base = tmp_path_factory.mktemp("sweep")
    root, results = base / "runs", base / "results"
    proc = _sweep(root, results)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, results, proc.stdout


@pytest.mark.slow
@pytest.mark.distributed  # the sweep trains its runs in processes of its own
def test_sweep_end_to_end_writes_every_output(swept):
    root, results, out = swept
    assert "2 runs planned, 0 already finished, 2 to do (+1 warm starts)" in out
    for v in ("grpo", "papo-g-exact"):
        run = root / v / "seed1"
        assert json.loads((run / "experiment.json").read_text())["variant"] == v
        # the shared warm start: copied in, reused by the trainer (no warm-start steps in its log)
        assert "sft step" not in (run / "train.log").read_text()
        assert (run / "sft_model" / "model.safetensors").read_bytes() == \
            (root / "warm" / "seed1" / "sft_model" / "model.safetensors").read_bytes()
        assert len([r for r in (results / "raw" / v / "seed1.jsonl").read_text().splitlines()
                    if '"reward/accuracy"' in r]) == 2
    rows = [json.loads(x) for x in (results / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["variant"] for r in rows) == ["grpo", "papo-g-exact"]
    assert {r["estimator"] for r in rows} == {"sampled", "exact"}
    assert {r["gamma"] for r in rows} == {0.0, 0.01}
    md = (results / "results.md").read_text()
    assert "| grpo | 1 |" in md and "| papo-g-exact | 1 |" in md
    pngs = {p.name for p in (results / "curves").iterdir()}
    assert pngs == {f"main_{m}.png" for m in ("accuracy", "heldout", "perception_kl", "entropy_full",
                                                "entropy_masked", "response_length")}


@pytest.mark.slow
@pytest.mark.distributed  # the sweep trains its runs in processes of its own
def test_sweep_skips_finished_runs_and_refuses_a_changed_setup(swept, tmp_path):
    root, _, _ = swept
    again = _sweep(root, tmp_path / "results2")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "2 runs planned, 2 already finished, 0 to do (+0 warm starts)" in again.stdout
    assert (tmp_path / "results2" / "results.md").exists()
    changed = _sweep(root, tmp_path / "results3", sets=TINY_SET + ["optim.lr=1e-2"])
    assert changed.returncode != 0 and "holds a sweep made with" in changed.stderr


@pytest.mark.slow
@pytest.mark.distributed  # the sweep trains its runs in processes of its own
def test_grad_noise_end_to_end(swept, tmp_path):
    from experiments import grad_noise

    root, _, _ = swept
    run = root / "papo-g-exact" / "seed1"
    args = ["--run", str(run), "--prompts", "2", "--resamples", "4", "--out", str(tmp_path)]
    assert grad_noise.main(args) == 0
    res = json.loads((tmp_path / "grad_noise.json").read_text())
    for policy in ("early", "late"):
        st = res["policies"][policy]["stats"]
        assert st["m"] == [1, 2]
        for est in ("sampled", "exact"):
            e = st["estimators"][est]
            assert e["trace_var"] > 0 and len(e["cosine_to_reference"]) == 2
            assert res["policies"][policy]["times"][est] > 0
        clamp = res["policies"][policy]["clamp"]
        assert -1 <= clamp["cos_expected_sampled_exact"] <= 1
        assert clamp["norm_ratio_expected_sampled_exact"] > 0
    assert (tmp_path / "grad_noise.png").stat().st_size > 0
    assert "| sampled |" in (tmp_path / "grad_noise.md").read_text()


def test_clamped_k3_expected_gradient_matches_autograd():
    # the expectation over the sampled token of autograd's gradient of papo's own k3, by enumeration
    from experiments.grad_noise import clamped_k3_expected_logit_gradient
    from papo.estimators import kl_k3

    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 7, generator=g, dtype=torch.float64)
    zm = z + 0.3 * torch.randn(3, 7, generator=g, dtype=torch.float64)
    z[1, 2], zm[1, 2] = -4.0, 4.0  # the masked view likes token 2 far more: its k3 is clamped
    logp, masked = torch.log_softmax(z, -1), torch.log_softmax(zm, -1)
    brute = torch.zeros_like(z)
    for y in range(7):
        zz = z.clone().requires_grad_(True)
        lp = torch.log_softmax(zz, -1)[:, y]
        kl_k3(lp, masked[:, y]).sum().backward()
        brute += logp[:, y:y + 1].exp() * zz.grad
    expected = clamped_k3_expected_logit_gradient(logp, masked)
    torch.testing.assert_close(expected, brute)
    exact = logp.exp() - masked.exp()
    torch.testing.assert_close(expected[[0, 2]], exact[[0, 2]])  # no clamp: the exact gradient
    assert not torch.allclose(expected[1], exact[1], atol=1e-3)


def test_grad_noise_statistics_known_answer():
    from experiments.grad_noise import noise_stats

    g = torch.Generator().manual_seed(0)
    R, P = 400, 50
    mean = torch.zeros(P, dtype=torch.float64)
    mean[0] = 10.0
    # tr Var = P sigma^2: exact sigma 1 -> rho 0.5; sampled sigma 2 -> rho 2.0
    exact = mean + torch.randn(R, P, generator=g, dtype=torch.float64)
    sampled = mean + 2 * torch.randn(R, P, generator=g, dtype=torch.float64)
    st = noise_stats({"sampled": sampled, "exact": exact})
    assert st["estimators"]["exact"]["rho"] == pytest.approx(0.5, rel=0.08)
    assert st["estimators"]["sampled"]["rho"] == pytest.approx(2.0, rel=0.08)
    assert st["estimators"]["exact"]["norm_expected"] == pytest.approx(10.0, rel=0.02)
    for e in st["estimators"].values():
        cos = e["cosine_to_reference"]
        assert all(b > a for a, b in zip(cos, cos[1:]))
    # one sample: E cos ~ 1 / sqrt(1 + rho)
    assert st["estimators"]["sampled"]["cosine_to_reference"][0] == pytest.approx(1 / math.sqrt(3), abs=0.05)
    assert st["cos_between_means"] > 0.99
