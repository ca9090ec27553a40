"""The step benchmark on the tiny Qwen2.5-VL: both sides compute the same PAPO step, and the
CLI reports time, memory and the first loss. Skipped without transformers (the `train` extra)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks import step as S  # noqa: E402

TINY = S.MODELS["tiny"]


def _stepper():
    torch.manual_seed(0)
    return S.Stepper(TINY, "cpu", "torch")


def test_sides_compute_the_same_step():
    """ours (fused kernels) and eager (materialized logits) give the same loss and gradients."""
    grads = {}
    for side in S.SIDES:
        st = _stepper()
        b = S.make_batch(st.model, TINY, 2, "cpu")
        st.opt.zero_grad(set_to_none=True)
        hidden = S._trunk(st.model, b, masked=False)
        with torch.no_grad():
            masked = S._trunk(st.model, b, masked=True)
        w = st.model.lm_head.weight
        if side == "ours":
            out = st.papo(hidden, w, b["completion_ids"], b["completion_mask"], b["advantages"],
                          masked_hidden=masked, num_micro_batches=1)
        else:
            out = S.eager_loss(st.config, hidden, masked, w, b)
        out.loss.backward()
        grads[side] = (out.loss.detach(), w.grad.clone(),
                       st.model.model.language_model.layers[0].mlp.down_proj.weight.grad.clone())
    for a, b in zip(grads["ours"], grads["eager"]):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-6)


def test_batch_layout():
    st = _stepper()
    b = S.make_batch(st.model, TINY, 3, "cpu")
    cfg = st.model.config
    assert b["input_ids"].shape == (3, TINY.sequence_tokens)
    assert (b["input_ids"] == cfg.image_token_id).sum(1).tolist() == [TINY.image_grid**2 // 4] * 3
    assert b["completion_ids"].shape == (3, TINY.completion_tokens)
    assert int(b["completion_ids"].max()) < cfg.text_config.vocab_size - 14
    assert not torch.equal(b["pixel_values"], b["masked_pixel_values"])


def test_step_benchmark(benchmark):
    st = _stepper()
    b = S.make_batch(st.model, TINY, 2, "cpu")
    loss = benchmark(lambda: st.step("ours", b))
    assert math.isfinite(loss)


def test_cli_rows(tmp_path):
    rows = S.main(["--model", "tiny", "--reps", "1", "--no-isolate", "--batch", "2", "--backend", "torch",
                   "--out-dir", str(tmp_path)])
    by = {r["side"]: r for r in rows}
    assert set(by) == {"ours", "eager"}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["max_batch"] == "gpu-only"
    assert by["ours"]["first_loss"] == pytest.approx(by["eager"]["first_loss"], rel=1e-4, abs=1e-6)
    md = next(tmp_path.glob("*.md")).read_text()
    assert "PAPO update step" in md and "`eager`" in md
