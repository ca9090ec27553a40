"""The catalog behind docs/reliability.md: every bad input, injected fault and attack figure it lists.

Bad inputs are `Case`s: a bad call into one component (the kernels API, the PAPO loss, the trainer
config, the data loader, the trainer) and what it must give: an error of a given type whose message
names what is wrong and what was expected (`Raises`), raised by our own validation rather than from
inside torch or a dependency, or a defined result stated in the documentation (`Documented`), which
the case itself asserts. Faults are `Fault`s, each checked by a named test of
tests/test_reliability_faults.py; the attacked reward path is measured by
`python -m benchmarks.attack_grader`, whose committed results this module summarizes.

    python -m tests.reliability_catalog            # run every case, rewrite docs/reliability.md
    python -m tests.reliability_catalog --check    # exit 1 if the committed file differs

The table shows each error message as the case produced it, so the committed file cannot drift:
tests/test_reliability_inputs.py runs each case and compares its message with the file's row, and
tests/test_reliability_docs.py re-renders the file from this catalog and the messages in it.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import math
import re
import struct
import sys
import tempfile
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "reliability.md"
GRADER_RESULTS = REPO / "benchmarks" / "results" / "attack_grader.json"
INPUT_TEST = "tests/test_reliability_inputs.py::test_bad_input"
# Errors must come from our own validation: the innermost frame of the traceback lies in one of these.
OWN_PACKAGES = ("papo_kernels", "papo", "train")
# component: (name in the summary, section title)
COMPONENTS = {
    "kernels": ("kernels API", "Kernels API (`papo_kernels`)"),
    "loss": ("PAPO loss", "PAPO loss (`papo`)"),
    "config": ("config", "Trainer config (`train/config.py`)"),
    "data": ("data loader", "Data loader (`train/data.py`)"),
    "trainer": ("trainer", "Trainer (`train/trainer.py`)"),
}


@dataclass(frozen=True)
class Raises:
    """The call raises `error` (a class, or "module:Name" imported when the case runs); its message
    contains every fragment of `names` (what is wrong and what was expected)."""

    error: type[BaseException] | str
    names: tuple[str, ...]

    def error_type(self) -> type[BaseException]:
        if isinstance(self.error, str):
            module, _, name = self.error.partition(":")
            return getattr(importlib.import_module(module), name)
        return self.error


@dataclass(frozen=True)
class Documented:
    """The call succeeds with the documented `result`, which the case's function asserts."""

    result: str


@dataclass(frozen=True)
class Case:
    id: str
    component: str
    bad_input: str
    run: Callable[[Context], Any]
    expect: Raises | Documented


@dataclass(frozen=True)
class Fault:
    id: str
    fault: str
    test: str
    asserted: str


class Context:
    """What a case may use: a fresh directory, and a tiny Qwen2.5-VL processor built on demand."""

    def __init__(self, tmp: Path, processor_factory: Callable[[], Any]) -> None:
        self.tmp = tmp
        self._processor_factory = processor_factory

    @property
    def processor(self):
        return self._processor_factory()


def build_processor(root: Path):
    """The processor of a freshly built tiny model (no download)."""
    from transformers import AutoProcessor

    from train.tiny import TinyModelSpec, build_tiny_model_dir

    model_dir = build_tiny_model_dir(root / "tiny", TinyModelSpec())
    return AutoProcessor.from_pretrained(model_dir, local_files_only=True)


# ----------------------------------------------------------------------------- running a case


def innermost_frame(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    return frames[-1].filename if frames else ""


def raised_by_our_code(error: BaseException) -> bool:
    path = Path(innermost_frame(error)).resolve()
    return any(path.is_relative_to(REPO / pkg) for pkg in OWN_PACKAGES)


def shown_message(error: BaseException, ctx: Context) -> str:
    """The error as the table shows it: one line, the case's temporary directory as <tmp>."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    text = text.replace(str(ctx.tmp), "<tmp>")
    text = re.sub(r" at 0x[0-9a-f]+", " at 0x…", text)
    return f"{type(error).__name__}: " + " ".join(text.split())


def execute(case: Case, ctx: Context) -> str:
    """Run `case`; returns the text of its "what is asserted" cell. AssertionError if it misbehaves."""
    if isinstance(case.expect, Documented):
        case.run(ctx)
        return case.expect.result
    try:
        case.run(ctx)
    except AssertionError:
        raise
    except BaseException as error:  # noqa: BLE001 - any raise is inspected below
        expected = case.expect.error_type()
        if not isinstance(error, expected):
            raise AssertionError(f"{case.id}: expected {expected.__name__}, got "
                                 f"{type(error).__name__}: {error}") from error
        message = shown_message(error, ctx)
        missing = [n for n in case.expect.names if n not in message]
        if missing:
            raise AssertionError(f"{case.id}: the message does not name {missing}: {message}") from error
        if not raised_by_our_code(error):
            raise AssertionError(f"{case.id}: raised from {innermost_frame(error)}, not by our own "
                                 f"validation: {message}") from error
        return message
    raise AssertionError(f"{case.id}: no error raised; expected {case.expect.error_type().__name__}")


# ----------------------------------------------------------------------------- kernels API

V, H, N = 16, 8, 5


def _kt(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(N, H, generator=g, dtype=dtype), torch.randn(V, H, generator=g, dtype=dtype),
            torch.randint(0, V, (N,), generator=g))


def _stats(**kw):
    import papo_kernels as pk

    h, w, t = _kt()
    args = dict(hidden=h, weight=w, targets=t)
    args.update(kw)
    return pk.token_stats(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


def _with_row(t, row, value):
    t = t.clone()
    t[row] = value
    return t


def _targets_unchecked(ctx):
    h, w, t = _kt()
    bad = _with_row(t, 1, V)
    got = _stats(targets=bad, check_inputs=False)
    clean = _stats()
    assert torch.isnan(got.logp[1]) and torch.isnan(got.entropy[1])
    keep = torch.arange(N) != 1
    assert torch.equal(got.logp[keep], clean.logp[keep])
    assert torch.equal(got.entropy[keep], clean.entropy[keep])


def _nan_hidden_unchecked(ctx):
    h, w, t = _kt()
    got = _stats(hidden=_with_row(h, 2, float("nan")))
    clean = _stats()
    assert torch.isnan(got.logp[2]) and torch.isnan(got.entropy[2])
    keep = torch.arange(N) != 2
    assert torch.equal(got.logp[keep], clean.logp[keep])
    assert torch.equal(got.entropy[keep], clean.entropy[keep])


def _inf_weight_unchecked(ctx):
    h, w, t = _kt()
    w = w.clone()
    w[3, 0] = float("inf")
    got = _stats(weight=w)
    assert not torch.isfinite(got.entropy).any()


def _zero_tokens(ctx):
    import papo_kernels as pk

    _, w, _ = _kt()
    got = pk.token_stats(torch.zeros(0, H), w, torch.zeros(0, dtype=torch.long))
    assert got.logp.shape == got.entropy.shape == (0,)
    h = torch.zeros(0, H, requires_grad=True)
    w = w.clone().requires_grad_()
    loss, _ = pk.fused_token_loss(h, w, torch.zeros(0, dtype=torch.long), lambda s, i: (s.logp.sum(), {}))
    loss.backward()
    assert loss.detach().item() == 0.0 and h.grad.shape == (0, H) and not w.grad.any()


def _all_ignored(ctx):
    import papo_kernels as pk

    h, w, _ = _kt()
    h, w = h.requires_grad_(), w.requires_grad_()
    targets = torch.full((N,), -100)
    got = pk.token_stats(h, w, targets)
    assert not got.logp.any() and not got.entropy.any()
    (got.logp.sum() + got.entropy.sum()).backward()
    assert not h.grad.any() and not w.grad.any()


def _two_views(**kw):
    import papo_kernels as pk

    h, w, t = _kt()
    return pk.two_view_stats(kw.get("hidden_a", h), kw.get("hidden_b", h), w, t)


def _fused(loss_fn):
    import papo_kernels as pk

    h, w, t = _kt()
    return pk.fused_token_loss(h.requires_grad_(), w, t, loss_fn)


KERNEL_CASES = [
    Case("kernels-hidden-not-a-tensor", "kernels", "hidden is a Python list",
         lambda c: _stats(hidden=_kt()[0].tolist()), Raises(TypeError, ("hidden", "torch.Tensor"))),
    Case("kernels-hidden-sparse", "kernels", "hidden is a sparse tensor",
         lambda c: _stats(hidden=_kt()[0].to_sparse()), Raises(ValueError, ("hidden", "dense"))),
    Case("kernels-weight-not-2d", "kernels", "weight is 1-D",
         lambda c: _stats(weight=_kt()[1][0]), Raises(ValueError, ("weight", "2-D [V, H]"))),
    Case("kernels-weight-integer", "kernels", "weight is an integer tensor",
         lambda c: _stats(weight=_kt()[1].long()), Raises(TypeError, ("weight", "floating"))),
    Case("kernels-empty-vocabulary", "kernels", "weight has V = 0 rows",
         lambda c: _stats(weight=_kt()[1][:0]), Raises(ValueError, ("weight", "vocabulary row"))),
    Case("kernels-zero-hidden-size", "kernels", "hidden and weight have H = 0 columns",
         lambda c: _stats(hidden=_kt()[0][:, :0], weight=_kt()[1][:, :0]),
         Raises(ValueError, ("weight", "H >= 1"))),
    Case("kernels-hidden-size-mismatch", "kernels", "hidden has 7 columns, weight 8",
         lambda c: _stats(hidden=_kt()[0][:, :7]),
         Raises(ValueError, ("hidden", "hidden size 7", "weight.shape[1]"))),
    Case("kernels-dtype-mismatch", "kernels", "hidden float64, weight float32",
         lambda c: _stats(hidden=_kt()[0].double()),
         Raises(TypeError, ("hidden", "float64", "float32", "must match"))),
    Case("kernels-device-mismatch", "kernels", "hidden on another device than weight (meta vs cpu)",
         lambda c: _stats(hidden=_kt()[0].to("meta")),
         Raises(ValueError, ("hidden", "meta", "cpu", "must match"))),
    Case("kernels-views-differ", "kernels", "two_view_stats with views of different shapes",
         lambda c: _two_views(hidden_b=_kt()[0][:4]), Raises(ValueError, ("hidden_b", "same shape"))),
    Case("kernels-targets-shape", "kernels", "targets shorter than hidden",
         lambda c: _stats(targets=_kt()[2][:4]), Raises(ValueError, ("targets", "shape (5,)"))),
    Case("kernels-targets-float", "kernels", "targets are floats",
         lambda c: _stats(targets=_kt()[2].float()), Raises(TypeError, ("targets", "integer"))),
    Case("kernels-targets-narrow", "kernels", "targets are int16 (too narrow for a vocabulary id)",
         lambda c: _stats(targets=_kt()[2].short()),
         Raises(TypeError, ("targets", "int64 or int32", "int16"))),
    Case("kernels-targets-too-large", "kernels", "a target id >= V",
         lambda c: _stats(targets=_with_row(_kt()[2], 3, V)),
         Raises(ValueError, ("targets", "[0, 16)", "targets[3]"))),
    Case("kernels-targets-negative", "kernels", "a negative target id other than ignore_index",
         lambda c: _stats(targets=_with_row(_kt()[2], 0, -5)),
         Raises(ValueError, ("targets", "[0, 16)", "= -5"))),
    Case("kernels-targets-unchecked", "kernels", "a target id >= V with check_inputs=False",
         _targets_unchecked, Documented("that row's log-prob and entropy are NaN, every other row equals the "
                                        "checked call's (check_inputs=False skips the host sync)")),
    Case("kernels-nan-hidden-checked", "kernels", "NaN in a row of hidden, check_finite=True",
         lambda c: _stats(hidden=_with_row(_kt()[0], 2, float("nan")), check_finite=True),
         Raises(ValueError, ("hidden", "NaN/Inf", "row [2]"))),
    Case("kernels-inf-weight-checked", "kernels", "Inf in a row of weight, check_finite=True",
         lambda c: _stats(weight=_with_row(_kt()[1], 3, float("inf")), check_finite=True),
         Raises(ValueError, ("weight", "NaN/Inf", "row [3]"))),
    Case("kernels-nan-hidden-unchecked", "kernels", "NaN in a row of hidden, check_finite=False (default)",
         _nan_hidden_unchecked, Documented("that row's outputs are NaN; every other row equals a clean "
                                           "computation bit for bit")),
    Case("kernels-inf-weight-unchecked", "kernels", "Inf in the weight, check_finite=False (default)",
         _inf_weight_unchecked, Documented("every row's entropy is non-finite (each row sees the whole "
                                           "vocabulary); check_finite=True turns it into the error above")),
    Case("kernels-zero-tokens", "kernels", "N = 0 tokens",
         _zero_tokens,
         Documented("empty [0] outputs; the fused loss is 0 and hidden/weight get zero gradients")),
    Case("kernels-all-ignored", "kernels", "every target equals ignore_index",
         _all_ignored, Documented("every output is 0 and hidden/weight get zero gradients")),
    Case("kernels-temperature-zero", "kernels", "temperature = 0",
         lambda c: _stats(temperature=0.0), Raises(ValueError, ("temperature", "finite and > 0"))),
    Case("kernels-temperature-nan", "kernels", "temperature = NaN",
         lambda c: _stats(temperature=math.nan), Raises(ValueError, ("temperature", "finite and > 0"))),
    Case("kernels-temperature-string", "kernels", 'temperature = "1.0"',
         lambda c: _stats(temperature="1.0"), Raises(TypeError, ("temperature", "float"))),
    Case("kernels-backend-unknown", "kernels", 'backend = "cuda"',
         lambda c: _stats(backend="cuda"), Raises(ValueError, ("backend", "one of"))),
    Case("kernels-strategy-unknown", "kernels", 'strategy = "fast"',
         lambda c: _stats(strategy="fast"), Raises(ValueError, ("strategy", "one of"))),
    Case("kernels-chunk-zero", "kernels", "chunk_tokens = 0",
         lambda c: _stats(chunk_tokens=0), Raises(ValueError, ("chunk_tokens", "positive int"))),
    Case("kernels-loss-fn-not-callable", "kernels", "fused_token_loss with loss_fn = None",
         lambda c: _fused(None), Raises(TypeError, ("loss_fn", "callable"))),
    Case("kernels-loss-fn-not-scalar", "kernels", "loss_fn returns a per-token vector, not a sum",
         lambda c: _fused(lambda s, i: (s.logp, {})), Raises(ValueError, ("loss_fn", "scalar loss"))),
]


# ----------------------------------------------------------------------------- PAPO loss

B, T = 2, 3


def _papo_config(**kw):
    from papo import PAPOConfig

    return PAPOConfig(**kw)


def _lp(seed=0):
    return torch.randn(B, T, generator=torch.Generator().manual_seed(seed))


def _loss(**kw):
    from papo import PAPOConfig, papo_loss

    lp = _lp()
    args = dict(logp=lp, old_logp=lp.clone(), advantages=torch.ones(B), mask=torch.ones(B, T),
                config=PAPOConfig(), masked_logp=_lp(1), num_micro_batches=1)
    args.update(kw)
    return papo_loss(args.pop("logp"), args.pop("old_logp"), args.pop("advantages"), args.pop("mask"), **args)


def _module(cfg=None, **kw):
    from papo import PAPOConfig, PAPOLoss

    g = torch.Generator().manual_seed(0)
    args = dict(hidden=torch.randn(B, T, H, generator=g, requires_grad=True),
                weight=torch.randn(V, H, generator=g, requires_grad=True),
                ids=torch.randint(0, V, (B, T), generator=g), mask=torch.ones(B, T), advantages=torch.ones(B),
                masked_logp=_lp(1), num_micro_batches=1)
    args.update(kw)
    module = PAPOLoss(cfg or PAPOConfig())
    tensors = [args.pop(k) for k in ("hidden", "weight", "ids", "mask", "advantages")]
    return module(*tensors, **args)


def _nan_where_masked(ctx):
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    poisoned = dict(logp=_lp().masked_fill(mask == 0, math.nan),
                    advantages=torch.tensor([[1.0, 1.0, math.nan], [-1.0, math.inf, math.nan]]))
    clean = dict(logp=_lp().masked_fill(mask == 0, 0.0),
                 advantages=torch.tensor([[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]))
    got, ref = _loss(mask=mask, **poisoned), _loss(mask=mask, **clean)
    assert torch.isfinite(got.loss) and torch.equal(got.loss, ref.loss)


def _nan_logp(ctx):
    out = _loss(logp=_with_row(_lp(), (0, 1), math.nan).requires_grad_())
    assert torch.isnan(out.loss)


def _all_masked(ctx):
    lp = _lp().requires_grad_()
    out = _loss(logp=lp, mask=torch.zeros(B, T))
    out.loss.backward()
    assert out.loss.item() == 0.0 and not lp.grad.any()
    assert {"loss/total", "loss/policy", "kl/perception", "tokens/count"} <= set(out.metrics)


def _module_nan_hidden(ctx):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g)
    hidden[1, 2] = math.nan
    out = _module(hidden=hidden.requires_grad_())
    assert torch.isnan(out.loss)


def _module_all_masked(ctx):
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(B, T, H, generator=g, requires_grad=True), torch.randn(V, H, generator=g,
                                                                                      requires_grad=True)
    out = _module(hidden=hidden, weight=weight, mask=torch.zeros(B, T))
    out.loss.backward()
    assert out.loss.detach().item() == 0.0 and not hidden.grad.any() and not weight.grad.any()


def _module_text_only(ctx):
    from papo import PAPOConfig

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    for estimator in ("exact", "sampled"):
        out = _module(PAPOConfig(masked_view="current_no_grad", estimator=estimator), hidden=hidden,
                      masked_hidden=hidden.detach().clone(), masked_logp=None)
        m = out.metrics
        assert float(m["kl/perception"]) == 0.0 and float(m["kl/perception_exact"]) == 0.0, estimator
        assert torch.equal(m["entropy/full"], m["entropy/masked"]), estimator


LOSS_CASES = [
    Case("loss-config-not-papoconfig", "loss", "papo_loss with config = {} (a dict)",
         lambda c: _loss(config={}), Raises(TypeError, ("config", "PAPOConfig"))),
    Case("loss-logp-1d", "loss", "logp is 1-D",
         lambda c: _loss(logp=_lp()[0]), Raises(ValueError, ("logp", "[B, T]"))),
    Case("loss-mask-values", "loss", "mask holds a 2",
         lambda c: _loss(mask=torch.full((B, T), 2)), Raises(ValueError, ("mask", "only 0 and 1"))),
    Case("loss-mask-shape", "loss", "mask of shape [2, 2] for logp [2, 3]",
         lambda c: _loss(mask=torch.ones(B, 2)), Raises(ValueError, ("mask", "shape (2, 3)"))),
    Case("loss-advantages-shape", "loss", "advantages of shape [3] for B = 2",
         lambda c: _loss(advantages=torch.ones(3)), Raises(ValueError, ("advantages", "[B]", "[B, T]"))),
    Case("loss-advantages-integer", "loss", "advantages are integers",
         lambda c: _loss(advantages=torch.ones(B, dtype=torch.long)),
         Raises(TypeError, ("advantages", "floating"))),
    Case("loss-advantages-nan", "loss", "a NaN advantage on a completion token",
         lambda c: _loss(advantages=torch.tensor([1.0, math.nan])),
         Raises(ValueError, ("advantages", "finite", "advantages[1]", "completion token"))),
    Case("loss-nan-outside-mask", "loss", "NaN/Inf log-probs and advantages where mask is 0",
         _nan_where_masked,
         Documented("dropped before any arithmetic: the loss equals that of the same batch with those "
                    "positions zeroed")),
    Case("loss-nan-logp", "loss", "a NaN log-prob on a completion token",
         _nan_logp, Documented("the loss is NaN (the trainer skips such an optimizer step and counts it, as "
                               "the official code does)")),
    Case("loss-device-mismatch", "loss", "old_logp on another device than logp (meta vs cpu)",
         lambda c: _loss(old_logp=_lp().to("meta")),
         Raises(ValueError, ("old_logp", "meta", "cpu", "must match"))),
    Case("loss-coefficient-inf", "loss", "coefficients gamma = inf",
         lambda c: _loss(coefficients=(math.inf, 0.0, 0.0)),
         Raises(ValueError, ("coefficients.gamma", "finite"))),
    Case("loss-coefficient-negative", "loss", "coefficients gamma = -1",
         lambda c: _loss(coefficients=(-1.0, 0.0, 0.0)), Raises(ValueError, ("coefficients.gamma", ">= 0"))),
    Case("loss-token-count-inf", "loss", "num_valid_tokens = inf (loss_scale global)",
         lambda c: _loss(config=_papo_config(loss_scale="global"), num_micro_batches=None,
                         num_valid_tokens=math.inf),
         Raises(ValueError, ("num_valid_tokens", "finite number >= 0"))),
    Case("loss-micro-batches-missing", "loss", "num_micro_batches missing with loss_scale microbatch",
         lambda c: _loss(num_micro_batches=None), Raises(ValueError, ("num_micro_batches", "required"))),
    Case("loss-masked-logp-missing", "loss", "masked_logp missing while gamma > 0",
         lambda c: _loss(masked_logp=None), Raises(ValueError, ("masked_logp", "required"))),
    Case("loss-all-masked", "loss", "an all-zero completion mask",
         _all_masked, Documented("loss 0, zero gradient, every metric key present")),
    Case("loss-module-ids-out-of-range", "loss", "PAPOLoss with a completion id >= V",
         lambda c: _module(ids=torch.full((B, T), V)),
         Raises(ValueError, ("completion_ids", "[0, 16)", "completion_ids[0, 0]"))),
    Case("loss-module-ids-narrow", "loss", "PAPOLoss with int16 completion ids",
         lambda c: _module(ids=torch.zeros(B, T, dtype=torch.int16)),
         Raises(TypeError, ("completion_ids", "int64 or int32", "int16"))),
    Case("loss-module-ids-float", "loss", "PAPOLoss with float completion ids",
         lambda c: _module(ids=torch.zeros(B, T)), Raises(TypeError, ("completion_ids", "integer"))),
    Case("loss-module-weight-dtype", "loss", "PAPOLoss with a float64 head for float32 hidden states",
         lambda c: _module(weight=torch.randn(V, H, dtype=torch.float64)),
         Raises(TypeError, ("lm_head_weight", "float64", "float32", "must match"))),
    Case("loss-module-masked-hidden-unused", "loss", "masked_hidden given with masked_view rollout_no_grad",
         lambda c: _module(masked_hidden=torch.zeros(B, T, H)),
         Raises(ValueError, ("masked_hidden", "rollout_no_grad"))),
    Case("loss-module-masked-hidden-dtype", "loss", "masked_hidden float64, hidden float32",
         lambda c: _module(_papo_config(masked_view="current_no_grad"),
                           masked_hidden=torch.zeros(B, T, H, dtype=torch.float64), masked_logp=None),
         Raises(TypeError, ("masked_hidden", "float64", "float32", "must match"))),
    Case("loss-module-nan-hidden", "loss", "PAPOLoss with a NaN hidden state on a completion token",
         _module_nan_hidden,
         Documented("the loss is NaN (the trainer skips such an optimizer step and counts it)")),
    Case("loss-module-all-masked", "loss", "PAPOLoss with an all-zero completion_mask",
         _module_all_masked, Documented("loss 0; hidden and lm_head_weight get zero gradients")),
    Case("loss-module-text-only", "loss",
         "a text-only sample (no image: the masked view equals the original)",
         _module_text_only, Documented("KL_prcp = 0 exactly and the masked entropy equals the full one, with "
                                       "either estimator")),
    Case("loss-config-unknown-preset", "loss", 'PAPOConfig.from_preset("papo-x")',
         lambda c: _papo_config().from_preset("papo-x"), Raises(ValueError, ("preset", "choose one of"))),
    Case("loss-config-gamma-nan", "loss", "PAPOConfig(gamma=nan)",
         lambda c: _papo_config(gamma=math.nan), Raises(ValueError, ("gamma", "finite"))),
    Case("loss-config-online-filter", "loss", "PAPOConfig(online_filter=(0.9, 0.1))",
         lambda c: _papo_config(online_filter=(0.9, 0.1)),
         Raises(ValueError, ("online_filter", "low < high"))),
]


# ----------------------------------------------------------------------------- trainer config


def _cfg(*overrides):
    from train.config import load_config

    return load_config(REPO / "train" / "configs" / "tiny.yaml", list(overrides))


def _cfg_file(ctx, text):
    from train.config import load_config

    path = ctx.tmp / "run.yaml"
    path.write_text(text)
    return load_config(path)


def _config_error(*names: str) -> Raises:
    return Raises("train.config:ConfigError", names)


def _load_config(path):
    from train.config import load_config

    return load_config(path)


CONFIG_CASES = [
    Case("config-unknown-key", "config", "an unknown top-level key (foo=1)",
         lambda c: _cfg("foo=1"), _config_error("['foo']", "valid keys")),
    Case("config-unknown-nested-key", "config", "a misspelt key (optim.lrr=1)",
         lambda c: _cfg("optim.lrr=1"), _config_error("optim.lrr", "valid keys")),
    Case("config-unknown-papo-key", "config", "a misspelt loss key (papo.gammma=1)",
         lambda c: _cfg("papo.gammma=1"), _config_error("papo.gammma", "PAPOConfig fields")),
    Case("config-wrong-type-number", "config", "a word for a number (optim.lr=fast)",
         lambda c: _cfg("optim.lr=fast"), _config_error("optim.lr", "must be a number", "'fast'")),
    Case("config-bool-for-int", "config", "a boolean for an integer (trainer.max_steps=true)",
         lambda c: _cfg("trainer.max_steps=true"), _config_error("trainer.max_steps", "integer")),
    Case("config-papo-wrong-type", "config", "a word for a loss coefficient (papo.gamma=high)",
         lambda c: _cfg("papo.gamma=high"), _config_error("papo", "gamma", "float")),
    Case("config-out-of-range", "config", "trainer.zero_stage=5",
         lambda c: _cfg("trainer.zero_stage=5"), _config_error("trainer.zero_stage", "0-3")),
    Case("config-not-dividing", "config", "a mini-batch that does not divide the rollout batch",
         lambda c: _cfg("trainer.mini_batch_size=5"), _config_error("trainer.mini_batch_size", "divide")),
    Case("config-choice", "config", "model.dtype=float16 (not a choice)",
         lambda c: _cfg("model.dtype=float16"), _config_error("model.dtype", "one of")),
    Case("config-section-scalar", "config", "a number for a section (optim=3)",
         lambda c: _cfg("optim=3"), _config_error("optim", "mapping")),
    Case("config-non-finite", "config", "rollout.temperature=.inf",
         lambda c: _cfg("rollout.temperature=.inf"), _config_error("rollout.temperature", "finite")),
    Case("config-negative-seed", "config", "seed=-1",
         lambda c: _cfg("seed=-1"), _config_error("seed", ">= 0")),
    Case("config-unknown-preset", "config", "papo.preset=nope",
         lambda c: _cfg("papo.preset=nope"), _config_error("unknown preset", "choose one of")),
    Case("config-override-syntax", "config", "an override without a value (optim.lr)",
         lambda c: _cfg("optim.lr"), _config_error("optim.lr", "key=value")),
    Case("config-malformed-yaml", "config", "a YAML file with an unclosed bracket",
         lambda c: _cfg_file(c, "optim: [1\n"), _config_error("run.yaml", "not valid YAML")),
    Case("config-duplicate-key", "config", "a YAML file that sets optim.lr twice",
         lambda c: _cfg_file(c, "optim:\n  lr: 1.0e-6\n  lr: 1.0e-3\n"),
         _config_error("run.yaml", "duplicate key 'lr'")),
    Case("config-top-level-list", "config", "a YAML file holding a list",
         lambda c: _cfg_file(c, "- optim\n- papo\n"), _config_error("mapping at the top level")),
    Case("config-missing-file", "config", "a config path that does not exist",
         lambda c: _load_config(c.tmp / "nope.yaml"),
         Raises(FileNotFoundError, ("config file not found",))),
]


# ----------------------------------------------------------------------------- data loader

PIXELS = dict(min_pixels=56 * 56, max_pixels=112 * 112)


def _png(width, height, colour=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def _png_header_only(width, height) -> bytes:
    """A PNG whose header claims width x height pixels with almost no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b""))


def _row(images, problem="<image>How many shapes are in the image?", answer="3"):
    return {"problem": problem, "answer": answer, "images": images}


def _image(data: bytes):
    return [{"bytes": data, "path": None}]


def _dataset(ctx, rows):
    from train.data import VisionRLDataset

    return VisionRLDataset(rows, ctx.processor, base_dir=str(ctx.tmp), **PIXELS)


def _good_row():
    return _row(_image(_png(40, 40)))


def _skipped(ctx, bad_row, counter, note):
    ds = _dataset(ctx, [bad_row, _good_row()])
    assert getattr(ds.stats, counter) == 1 and ds.indices == [1], ds.stats
    assert any(note in e for e in ds.stats.examples), ds.stats.examples


def _truncated(ctx):
    png = _png(40, 40)
    ds = _dataset(ctx, [_row(_image(png[: len(png) // 2])), _good_row()])
    assert ds.indices == [0, 1]  # the header reads: only decoding the pixels fails
    item = ds[0]
    assert item["uid"] == 1 and ds.stats.skipped_at_access == 1, ds.stats


def _huge_image(ctx):
    from train.data import process_image

    ds = _dataset(ctx, [_row(_image(_png(2400, 1800)))])
    img = process_image(ds[0]["images"][0], **PIXELS)
    assert img.width * img.height <= PIXELS["max_pixels"], img.size


def _tiny_image(ctx):
    from train.data import process_image

    ds = _dataset(ctx, [_row(_image(_png(1, 1)))])
    img = process_image(ds[0]["images"][0], **PIXELS)
    assert img.width * img.height >= PIXELS["min_pixels"] * 0.95, img.size


def _text_only(ctx):
    ds = _dataset(ctx, [_row([], problem="What is 2 + 3?", answer="5")])
    item = ds[0]
    assert item["images"] == [] and "<image>" not in item["prompt"] and item["answer"] == "5"


def _load_records(path):
    from train.data import load_records

    return load_records(path)


def _records(ctx, name, text):
    from train.data import load_records

    path = ctx.tmp / name
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    return load_records(path)


DATA_CASES = [
    Case("data-zero-byte-image", "data", "an image of 0 bytes",
         lambda c: _skipped(c, _row(_image(b"")), "undecodable", "cannot identify image file"),
         Documented("row skipped when the dataset is built and counted in stats.undecodable, the note "
                    "names the row and the decoder's error")),
    Case("data-truncated-image", "data", "a PNG cut in half",
         _truncated, Documented("its header reads, its pixels do not: skipped when first accessed, counted "
                                "in stats.skipped_at_access, the next decodable row served instead")),
    Case("data-decompression-bomb", "data", "a PNG header claiming 100000 x 100000 pixels",
         lambda c: _skipped(c, _row(_image(_png_header_only(100_000, 100_000))), "undecodable",
                            "DecompressionBombError"),
         Documented("refused from the header alone by PIL's decompression-bomb check (nothing is decoded), "
                    "counted in stats.undecodable")),
    Case("data-huge-image", "data", "a real 2400 x 1800 image",
         _huge_image, Documented("kept and downscaled to at most max_pixels before the processor sees it")),
    Case("data-tiny-image", "data", "a 1 x 1 image",
         _tiny_image, Documented("kept and upscaled to about min_pixels")),
    Case("data-extreme-aspect-ratio", "data", "a 1 x 3000 image",
         lambda c: _skipped(c, _row(_image(_png(1, 3000))), "bad_rows", "aspect ratio"),
         Documented("the Qwen2.5-VL processor refuses it (aspect ratio above 200): the row is skipped "
                    "and counted in stats.bad_rows with the processor's reason, instead of stopping the "
                    "dataset build")),
    Case("data-missing-image-file", "data", "an image path that does not exist",
         lambda c: _skipped(c, _row(["missing.png"]), "undecodable", "missing.png"),
         Documented("row skipped and counted in stats.undecodable, the note names the file")),
    Case("data-text-only-row", "data", "a text-only row (no <image>, images = [])",
         _text_only, Documented("kept, with images == [] and a prompt without image placeholders")),
    Case("data-placeholder-mismatch", "data", "one <image> placeholder and no image",
         lambda c: _skipped(c, _row([], problem="<image>How many?"), "bad_rows", "placeholders but 0 images"),
         Documented("row skipped and counted in stats.bad_rows")),
    Case("data-images-not-a-list", "data", "images = 5",
         lambda c: _skipped(c, _row(5), "bad_rows", "must be a list of images"),
         Documented("row skipped and counted in stats.bad_rows (the note: 'images' must be a list of "
                    "images, got int)")),
    Case("data-problem-not-a-string", "data", "problem = None",
         lambda c: _skipped(c, _row(_image(_png(40, 40)), problem=None), "bad_rows", "not a string"),
         Documented("row skipped and counted in stats.bad_rows")),
    Case("data-missing-column", "data", "rows without the answer field",
         lambda c: _dataset(c, [{"problem": "<image>x", "images": _image(_png(8, 8))}]),
         Raises(KeyError, ("'answer'", "answer_key", "its fields are"))),
    Case("data-no-usable-rows", "data", "every row bad",
         lambda c: _dataset(c, [_row(_image(b""))]), Raises(ValueError, ("no usable rows",))),
    Case("data-missing-path", "data", "a dataset path that does not exist",
         lambda c: _load_records(c.tmp / "nope"),
         Raises(FileNotFoundError, ("dataset path does not exist",))),
    Case("data-unsupported-suffix", "data", "a .csv file",
         lambda c: _records(c, "rows.csv", "problem,answer\n"),
         Raises(ValueError, ("rows.csv", "must end in one of"))),
    Case("data-malformed-jsonl", "data", "a JSONL file whose second line is broken",
         lambda c: _records(c, "rows.jsonl", '{"problem": "x", "answer": "1", "images": []}\n{not json\n'),
         Raises(ValueError, ("rows.jsonl", "line 2", "not valid JSON"))),
    Case("data-jsonl-not-an-object", "data", "a JSONL line holding a list",
         lambda c: _records(c, "rows.jsonl", '{"problem": "x", "answer": "1", "images": []}\n[1, 2]\n'),
         Raises(ValueError, ("rows.jsonl", "line 2", "JSON object"))),
    Case("data-empty-jsonl", "data", "an empty JSONL file",
         lambda c: _records(c, "rows.jsonl", ""), Raises(ValueError, ("rows.jsonl", "no rows"))),
    Case("data-corrupt-parquet", "data", "a .parquet file of garbage bytes",
         lambda c: _records(c, "rows.parquet", b"not parquet" * 10),
         Raises(ValueError, ("rows.parquet", "not a readable parquet file"))),
    Case("data-empty-directory", "data", "a dataset directory without data files",
         lambda c: _load_records(c.tmp),
         Raises(FileNotFoundError, ("no parquet files", "'train'"))),
]


# ----------------------------------------------------------------------------- trainer


def _state_of(cfg, world=1):
    from train.checkpoint import resume_fingerprint

    return {"step": 2, "stream": {"epoch": 0, "pos": 16}, "world_size": world,
            "config": resume_fingerprint(cfg)}


def _resume_check(ctx, *, saved_cfg, cfg, world):
    from train.checkpoint import check_resumable

    check_resumable(_state_of(saved_cfg), ctx.tmp / "step_000002", world=world, cfg=cfg)


def _checkpoint_error(*names: str) -> Raises:
    return Raises("train.checkpoint:CheckpointError", names)


def _unreadable_state(ctx):
    from train.checkpoint import read_trainer_state

    path = ctx.tmp / "step_000002"
    path.mkdir()
    (path / "COMPLETE").write_text("ok\n")
    (path / "trainer_state.json").write_text('{"step": 2, "stream"')  # cut short
    read_trainer_state(path)


def _partial_ignored(ctx):
    from train.checkpoint import COMPLETE_MARKER, complete_checkpoints

    root = ctx.tmp / "checkpoints"
    for name, complete in (("step_000001", True), ("step_000002", False), (".tmp-step_000003", True)):
        (root / name).mkdir(parents=True)
        (root / name / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if complete:
            (root / name / COMPLETE_MARKER).write_text("ok\n")
    assert [p.name for p in complete_checkpoints(root)] == ["step_000001"]


def _trainer(*overrides):
    from train.trainer import Trainer

    return Trainer(_cfg(*overrides))


TRAINER_CASES = [
    Case("trainer-resume-world-size", "trainer", "resuming a checkpoint written by 1 rank with 2",
         lambda c: _resume_check(c, saved_cfg=_cfg(), cfg=_cfg(), world=2),
         _checkpoint_error("world size 1", "world size 2", "resume with world size 1")),
    Case("trainer-resume-config", "trainer", "resuming a ZeRO-0 checkpoint with trainer.zero_stage=3",
         lambda c: _resume_check(c, saved_cfg=_cfg(), cfg=_cfg("trainer.zero_stage=3"), world=1),
         _checkpoint_error("trainer.zero_stage", "0 in the checkpoint", "3 now", "allow_changed_keys")),
    Case("trainer-resume-loss-changed", "trainer", "resuming with another loss preset",
         lambda c: _resume_check(c, saved_cfg=_cfg(), cfg=_cfg("papo.preset=papo-g-7b"), world=1),
         _checkpoint_error("papo.beta", "in the checkpoint", "now")),
    Case("trainer-resume-state-unreadable", "trainer", "a complete checkpoint whose trainer_state.json "
                                                       "is cut short",
         _unreadable_state, _checkpoint_error("trainer_state.json", "cannot be read", "previous checkpoint")),
    Case("trainer-partial-checkpoint", "trainer", "checkpoint directories without their COMPLETE marker",
         _partial_ignored,
         Documented("never listed for resuming: only step_000001 (complete) is, not step_000002 "
                                      "(no marker) nor .tmp-step_000003 (a temporary copy)")),
    Case("trainer-temperature-mismatch", "trainer", "papo.temperature=0.7 with rollout.temperature=1.0",
         lambda c: _trainer("papo.temperature=0.7"),
         _config_error("papo.temperature", "rollout.temperature", "must equal")),
    Case("trainer-grpo-one-rollout", "trainer", "rollout.n=1 with GRPO advantages",
         lambda c: _trainer("rollout.n=1"), _config_error("rollout.n", ">= 2", "GRPO")),
]

CASES = KERNEL_CASES + LOSS_CASES + CONFIG_CASES + DATA_CASES + TRAINER_CASES


# ----------------------------------------------------------------------------- faults

FAULT_TEST = "tests/test_reliability_faults.py"
CHAIN_TEST = f"{FAULT_TEST}::test_faults_then_resume_match_an_uninterrupted_run"
FAULTS = [
    Fault("kill-after-first-shard", "SIGKILL of the rank right after the first file (a DeepSpeed shard) of "
          "checkpoint step_000002 is written", CHAIN_TEST,
          "the process dies by SIGKILL; step_000002 exists only as .tmp-step_000002 with that one shard "
          "and no "
          "COMPLETE marker; the restart resumes from step_000001 and deletes the partial copy"),
    Fault("kill-mid-update", "SIGKILL in the middle of rollout step 3's update, after its first "
                             "optimizer step "
          "and before its second", CHAIN_TEST,
          "the process dies by SIGKILL; the restart resumes from step_000002, the newest complete "
          "checkpoint"),
    Fault("enospc-in-checkpoint", "ENOSPC raised by the checkpoint writer at the second file of step_000003",
          CHAIN_TEST, "CheckpointError naming the failure and the intact step_000002; the partial copy "
                      "is removed; "
          "the restart resumes from step_000002 and drops step 3's metrics record"),
    Fault("grader-death-in-run", "a grading worker SIGKILLed at its third answer during the resumed run",
          CHAIN_TEST, "the answer is graded again on a fresh worker (1 worker death, 1 retry); after "
                      "all four "
          "faults, the metrics of steps 1-4 equal the uninterrupted run's (timings aside) and the final "
          "weights "
          "are bitwise equal"),
    Fault("resume-other-world-size", "restarting the faulted run with another world size", CHAIN_TEST,
          "CheckpointError before anything is loaded"),
    Fault("grader-worker-dies", "a grading worker SIGKILLed at its second answer",
          f"{FAULT_TEST}::test_grader_worker_that_dies_or_hangs_changes_no_grade",
          "the answer is graded again on a fresh worker; all grades equal a fault-free grader's"),
    Fault("grader-worker-hangs", "a grading worker that hangs at its fourth answer",
          f"{FAULT_TEST}::test_grader_worker_that_dies_or_hangs_changes_no_grade",
          "the worker is killed at its deadline and the answer graded again (1 timeout, 1 death, 2 retries); "
          "all grades equal a fault-free grader's; no child process or file descriptor is left after "
          "close()"),
]


# ----------------------------------------------------------------------------- the document


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _uncell(text: str) -> str:
    return text.replace("\\|", "|")


def case_test_id(case: Case) -> str:
    return f"{INPUT_TEST}[{case.id}]"


def documented_cells(text: str) -> dict[str, str]:
    """{test id: "what is asserted" cell} of the tables of a rendered docs/reliability.md."""
    cells = {}
    for line in text.splitlines():
        m = re.match(r"^\| (.*?) \| `([^`]+)` \| (.*) \|$", line)
        if m:
            cells[m.group(2)] = _uncell(m.group(3))
    return cells


def grader_summary(results: dict[str, Any] | None) -> str:
    if results is None:
        return "not measured yet: run `python -m benchmarks.attack_grader`"
    load = results["load"]
    return (f"{results['answers']:,} adversarial answers of {len(results['kinds'])} kinds graded by "
            f"{results['backend']}: {results['past_deadline']} ran past the deadline (slowest attempt "
            f"{results['slowest_attempt_s']:.2f} s of {results['timeout_s']:.0f} s), canary file created: "
            f"{'yes' if results['canary_created'] else 'no'} ({results['canary_payloads']:,} payloads), "
            "child "
            f"processes {results['children_before']} -> {results['children_after']}, open file descriptors "
            f"{results['fds_before']} -> {results['fds_after']}, ordinary-answer throughput "
            f"{results['throughput_ratio']:.2f}x an idle grader's (load average {load:.1f} on "
            f"{results['cpus']} CPUs)")


def render(messages: dict[str, str], grader: dict[str, Any] | None) -> str:
    """docs/reliability.md from the catalog, `messages` {case id: asserted cell} and the grader results."""
    raising = sum(isinstance(c.expect, Raises) for c in CASES)
    per = ", ".join(f"{name} {sum(c.component == k for c in CASES)}" for k, (name, _) in COMPONENTS.items())
    lines = [
        "# Reliability in figures",
        "",
        "What the stack promises when it is given bad input, when a process dies or a disk fills up, and",
        "when the reward path is fed hostile answers, and the test that checks each promise. This file is",
        "generated: `python -m tests.reliability_catalog` runs every bad-input case of",
        "`tests/reliability_catalog.py` and writes the messages they produce; the suite fails when a",
        "message, a case or a figure here differs from what the code does (`tests/test_reliability_*.py`).",
        "",
        "## Summary",
        "",
        f"- **Bad input:** {len(CASES)} cases ({per}): {raising} raise an error that names what is wrong and "
        f"what was expected, raised by our own validation (never from inside torch or a dependency), and "
        f"{len(CASES) - raising} give the documented result stated below.",
        f"- **Faults:** {len(FAULTS)} injected deterministically (at counted arrivals at named points, "
        "`papo/faults.py`, never by timers): after each, the restart resumes from the newest complete "
        "checkpoint, no partial checkpoint is ever loaded, and the resumed run's metrics equal an "
        "uninterrupted run's.",
        f"- **Reward path under attack:** {grader_summary(grader)}"
        + (". Details: [reliability_grader.md](reliability_grader.md)." if grader else "."),
        "",
        "## Bad input",
        "",
        "Error messages are shown as raised (`<tmp>` stands for the test's temporary directory).",
    ]
    for key, (_, title) in COMPONENTS.items():
        lines += ["", f"### {title}", "", "| case | test id | what is asserted |", "|---|---|---|"]
        for case in (c for c in CASES if c.component == key):
            lines.append(f"| {_cell(case.bad_input)} | `{case_test_id(case)}` | {_cell(messages[case.id])} |")
    lines += ["", "## Faults", "",
              "Injected through `PAPO_FAULTS` (see `papo/faults.py`) into a 4-step tiny run (1 rank, ZeRO-0,",
              "a checkpoint every step) and into the answer grader.", "",
              "| case | test id | what is asserted |", "|---|---|---|"]
    for fault in FAULTS:
        lines.append(f"| {_cell(fault.fault)} | `{fault.test}` | {_cell(fault.asserted)} |")
    lines += ["", "## Reward path under attack", "",
              "`python -m benchmarks.attack_grader` generates adversarial answers, grades them through",
              "`papo.rewards.compute_score` and writes `docs/reliability_grader.md` and",
              "`benchmarks/results/attack_grader.json`; CI grades a sample of them",
              "(`tests/test_reliability_grader.py`).", ""]
    if grader is not None:
        lines += ["| kind | answers | example |", "|---|---|---|"]
        from benchmarks.attack_grader import display_example

        for kind, row in grader["kinds"].items():
            lines.append(f"| {_cell(kind)} | {row['answers']:,} | `{display_example(row['example'])}` |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def load_grader_results() -> dict[str, Any] | None:
    return json.loads(GRADER_RESULTS.read_text()) if GRADER_RESULTS.exists() else None


def run_all(tmp_root: Path) -> dict[str, str]:
    """{case id: asserted cell} for every case (raising AssertionError on the first that misbehaves)."""
    processor = []

    def factory():
        if not processor:
            processor.append(build_processor(tmp_root))
        return processor[0]

    messages = {}
    for i, case in enumerate(CASES):
        tmp = tmp_root / f"case{i}"
        tmp.mkdir()
        messages[case.id] = execute(case, Context(tmp, factory))
    return messages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if the file differs")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        text = render(run_all(Path(tmp)), load_grader_results())
    if args.check:
        same = DOC.exists() and DOC.read_text() == text
        print("docs/reliability.md is up to date" if same else "docs/reliability.md differs: regenerate it")
        return 0 if same else 1
    DOC.write_text(text)
    print(f"wrote {DOC.relative_to(REPO)} ({len(CASES)} cases, {len(FAULTS)} faults)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
