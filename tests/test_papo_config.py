"""papo.PAPOConfig: official defaults, presets, validation, coefficient schedule."""

import pytest

from papo import PAPOConfig
from papo.config import Coefficients


def test_defaults_are_the_official_recipe():
    c = PAPOConfig()
    assert c.estimator == "sampled" and c.masked_view == "rollout_no_grad"
    assert c.kl_prcp_direction == "masked_to_full"
    assert (c.clip_low, c.clip_high, c.dual_clip) == (0.2, 0.3, 3.0)
    assert (c.loss_agg, c.loss_scale) == ("token-mean", "microbatch")
    assert (c.gamma, c.eta_full, c.eta_masked, c.beta) == (0.01, 0.03, 0.03, 0.0)
    assert (c.gamma_schedule, c.ref_kl_estimator, c.temperature) == ("fixed", "k3", 1.0)
    assert (c.mask_patch_size, c.mask_prob, c.online_filter) == (14, 0.6, None)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("papo-g-nref-7b", dict(gamma=0.01, beta=0.0, eta_full=0.03, eta_masked=0.03, clip_high=0.3)),
        ("papo-g-3b", dict(gamma=0.01, beta=0.01, eta_full=0.0, eta_masked=0.0)),
        ("papo-g-7b", dict(gamma=0.01, beta=0.01, eta_full=0.0, eta_masked=0.0)),
        ("papo-g-h-7b", dict(gamma=0.02, beta=0.01, eta_full=0.03, eta_masked=0.03)),
        ("papo-d-7b", dict(gamma=0.01, beta=0.0, eta_full=0.03, eta_masked=0.03, clip_high=0.28,
                           online_filter=(0.01, 0.99))),
        ("grpo", dict(gamma=0.0, beta=0.01, eta_full=0.0, eta_masked=0.0)),
    ],
)
def test_presets(name, expected):
    c = PAPOConfig.from_preset(name)
    for key, value in expected.items():
        assert getattr(c, key) == value, key
    assert c.preset == name
    assert c.estimator == "sampled" and c.clip_low == 0.2 and c.dual_clip == 3.0
    assert name in PAPOConfig.presets()


def test_preset_overrides_and_errors():
    c = PAPOConfig.from_preset("papo-g-nref-7b", estimator="exact", masked_view="current_no_grad")
    assert c.estimator == "exact" and c.gamma == 0.01
    with pytest.raises(ValueError, match="unknown preset"):
        PAPOConfig.from_preset("papo-x")
    with pytest.raises(TypeError, match="gamma_typo"):
        PAPOConfig.from_preset("grpo", gamma_typo=1.0)


@pytest.mark.parametrize(
    "field, value, exc",
    [
        ("estimator", "mc", ValueError),
        ("kl_prcp_direction", "both", ValueError),
        ("masked_view", "none", ValueError),
        ("loss_agg", "seq-mean", ValueError),
        ("loss_scale", "local", ValueError),
        ("gamma_schedule", "cosine", ValueError),
        ("ref_kl_estimator", "k4", ValueError),
        ("clip_low", 1.0, ValueError),
        ("clip_low", -0.1, ValueError),
        ("clip_high", -0.1, ValueError),
        ("dual_clip", 1.0, ValueError),
        ("gamma", -0.01, ValueError),
        ("gamma", float("nan"), ValueError),
        ("gamma", "0.01", TypeError),
        ("eta_full", -1.0, ValueError),
        ("eta_masked", True, TypeError),
        ("beta", -0.1, ValueError),
        ("temperature", 0.0, ValueError),
        ("gamma_anneal_ratio", 0.0, ValueError),
        ("gamma_anneal_ratio", 1.5, ValueError),
        ("mask_prob", 1.5, ValueError),
        ("mask_patch_size", 0, ValueError),
        ("mask_patch_size", 14.0, TypeError),
        ("seq_sum_norm_divisor", 0, ValueError),
        ("online_filter", (0.99, 0.01), ValueError),
        ("online_filter", (0.1,), ValueError),
        ("online_filter", (-0.1, 0.5), ValueError),
    ],
)
def test_validation_names_the_field(field, value, exc):
    with pytest.raises(exc, match=field.split("[")[0]):
        PAPOConfig(**{field: value})


def test_exact_needs_a_current_masked_view():
    with pytest.raises(ValueError, match="masked_view"):
        PAPOConfig(estimator="exact")
    for view in ("current_no_grad", "live"):
        assert PAPOConfig(estimator="exact", masked_view=view).masked_view == view


def test_fixed_schedule():
    c = PAPOConfig(gamma=0.02, eta_full=0.03, eta_masked=0.01)
    assert c.coefficients(0, 10) == Coefficients(0.02, 0.03, 0.01)
    assert c.coefficients(9, 10) == Coefficients(0.02, 0.03, 0.01)


def test_linear_schedule_hand_values():
    # A = int(10 * 0.5) = 5 annealing steps from 0.02 to 0; the etas get the same discount
    c = PAPOConfig(gamma=0.02, gamma_schedule="linear", gamma_end=0.0, gamma_anneal_ratio=0.5)
    expected = {0: (0.02, 1.0), 2: (0.012, 0.6), 5: (0.0, 0.0), 7: (0.0, 0.0)}
    for step, (gamma, discount) in expected.items():
        g, ef, em = c.coefficients(step, 10)
        assert g == pytest.approx(gamma, abs=1e-15)
        assert ef == pytest.approx(0.03 * discount, abs=1e-15)
        assert em == pytest.approx(0.03 * discount, abs=1e-15)
    # towards a non-zero end value
    c = PAPOConfig(gamma=0.01, gamma_schedule="linear", gamma_end=0.02, gamma_anneal_ratio=1.0)
    assert c.coefficients(2, 4) == pytest.approx((0.015, 0.045, 0.045))


@pytest.mark.parametrize("step, total, name", [(-1, 10, "step"), (0, 0, "total_steps"), (1.5, 10, "step")])
def test_coefficients_bad_input(step, total, name):
    with pytest.raises((ValueError, TypeError), match=name):
        PAPOConfig().coefficients(step, total)


def test_seq_sum_norm_needs_its_constant_divisor():
    with pytest.raises(ValueError, match="seq_sum_norm_divisor must be set"):
        PAPOConfig(loss_agg="seq-sum-norm")
    assert PAPOConfig(loss_agg="seq-sum-norm", seq_sum_norm_divisor=2048).seq_sum_norm_divisor == 2048


def test_config_is_immutable_after_validation():
    """Fields change only through dataclasses.replace, which validates again."""
    import dataclasses

    cfg = PAPOConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.estimator = "exact"
    with pytest.raises(ValueError, match="masked_view"):
        dataclasses.replace(cfg, estimator="exact")
