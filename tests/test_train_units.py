"""Units of the trainer: learning-rate schedules, the guard's spike statistic, recipes' [model]."""

from __future__ import annotations

import itertools
import math

import pytest

from camelid.train.guard import Guard
from camelid.train.recipe import GuardSection, RecipeError, load_recipe
from camelid.train.schedule import lr_at


def recipe(kind: str, steps: int = 100, warmup: int = 10, decay: float = 0.2):
    return load_recipe(None, ["data.dir=x", f"schedule.kind={kind}", f"train.steps={steps}",
                              f"schedule.warmup_steps={warmup}", f"schedule.decay_fraction={decay}",
                              "optim.lr=1e-3", "optim.min_lr=1e-4"])  # fmt: skip


def test_warmup_is_linear_to_the_peak():
    r = recipe("cosine")
    assert [lr_at(s, r) for s in range(10)] == pytest.approx([1e-4 * (s + 1) for s in range(10)])
    assert lr_at(10, r) == pytest.approx(1e-3)  # the first step after warm-up is the peak


def test_cosine_decays_to_the_floor_through_the_midpoint():
    r = recipe("cosine")
    lrs = [lr_at(s, r) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))  # non-increasing
    assert lr_at(55, r) == pytest.approx((1e-3 + 1e-4) / 2)  # half-way: the mean of both ends
    expected = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * 89 / 90))
    assert lr_at(99, r) == pytest.approx(expected)
    assert lr_at(150, r) == pytest.approx(1e-4)  # past the end: the floor


def test_wsd_holds_then_decays_linearly_to_the_floor():
    r = recipe("wsd", decay=0.2)
    assert all(lr_at(s, r) == pytest.approx(1e-3) for s in range(10, 80))
    decay = [lr_at(s, r) for s in range(80, 100)]
    steps = [a - b for a, b in itertools.pairwise(decay)]
    assert max(steps) == pytest.approx(min(steps))  # linear
    assert decay[-1] == pytest.approx(1e-4)  # the last step reaches min_lr


def test_constant_and_no_warmup():
    r = recipe("constant", warmup=0)
    assert {lr_at(s, r) for s in (0, 50, 99)} == {1e-3}


def guard(**kw) -> Guard:
    return Guard(GuardSection(**{"window": 10, "min_history": 5, "z_threshold": 6.0, **kw}))


def test_spike_statistic_is_the_robust_z_score():
    g = guard()
    history = [3.0, 3.1, 2.9, 3.05, 2.95, 3.0, 3.2]
    for loss in history:
        assert g.verdict(loss, 1.0) is None
    median = sorted(history)[len(history) // 2]  # 3.0
    mad = sorted(abs(v - median) for v in history)[len(history) // 2]
    sigma = 1.4826 * mad
    below, above = median + 5.9 * sigma, median + 6.1 * sigma
    assert g._z(below) == pytest.approx(5.9) and g.verdict(below, 1.0) is None
    g2 = guard()
    for loss in history:
        g2.verdict(loss, 1.0)
    assert g2.verdict(above, 1.0) == "spike"
    assert g2.bad_streak == 1 and above not in g2.recent  # a bad loss is not remembered


def test_spike_floor_and_warm_up():
    g = guard(min_history=3)
    assert g.verdict(100.0, 1.0) is None  # no history yet: nothing is a spike
    g = guard()
    for _ in range(8):
        g.verdict(2.0, 1.0)  # identical losses: MAD 0, so the floor (0.5% of the median) holds
    assert g._z(2.0 + 6.5 * 0.01) == pytest.approx(6.5)
    assert g.verdict(2.05, 1.0) is None  # a 2.5% wobble is 2.5 floored sigmas
    assert g.verdict(2.2, 1.0) == "spike"  # 10% is 10


def test_nonfinite_streak_and_roll_back():
    g = guard(max_bad_steps=2)
    assert g.verdict(float("nan"), 1.0) == "nonfinite" and not g.must_roll_back
    assert g.verdict(3.0, float("inf")) == "nonfinite" and g.must_roll_back
    assert g.verdict(3.0, 1.0) is None and g.bad_streak == 0 and not g.must_roll_back
    state = g.state_dict()
    h = guard(max_bad_steps=2)
    h.load_state_dict(state)
    assert list(h.recent) == list(g.recent) and h.bad_streak == g.bad_streak
    assert guard(enabled=False).verdict(float("nan"), 1.0) is None
    assert not guard(max_bad_steps=0, min_history=0).must_roll_back


def test_window_forgets_old_losses():
    g = guard(window=5, min_history=5)
    for loss in [10.0] * 5 + [1.0] * 5:
        g.verdict(loss, 1.0)
    assert list(g.recent) == [1.0] * 5


def model_recipe(*sets: str):
    return load_recipe(None, ["data.dir=x", "model.preset=tiny", *sets])


def test_model_section_is_a_preset_plus_modelconfig_fields():
    rope = "model.rope_scaling={factor=4.0, original_max_position_embeddings=64}"
    r = model_recipe("model.dim=128", "model.norm_eps=1e-6", "model.ffn_dim_multiplier=1.5", rope)
    c = r.model_config(300)
    assert (c.dim, c.n_layers, c.norm_eps, c.vocab_size) == (128, 2, 1e-6, 300)
    assert c.rope_scaling.factor == 4.0 and c.rope_scaling.original_max_position_embeddings == 64
    assert c.max_seq_len == 256  # the preset's, as it covers train.seq_len
    again = load_recipe_text(r.to_toml())
    assert again.model_config(300) == c  # the written recipe reads back to the same model
    assert model_recipe("train.seq_len=1024").model_config(300).max_seq_len == 1024
    assert model_recipe("model.vocab_size=1000").model_config(300).vocab_size == 1000


def load_recipe_text(text: str):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.toml"
        path.write_text(text)
        return load_recipe(path)


def test_moe_recipes_give_moe_models():
    sets = ["model.n_experts=4", "model.moe_ffn_dim=64", "model.n_shared_experts=1"]
    config = model_recipe(*sets).model_config(300)
    assert config.is_moe and config.n_experts == 4


@pytest.mark.parametrize(
    "sets,needle",
    [
        (["model.dimm=3"], "unknown recipe key model.dimm"),
        (["model.name='x'"], "unknown recipe key model.name"),
        (["model.dim=3.5"], "model.dim must be int"),
        (["model.dim=0"], "model.dim must be a positive integer"),
        (["model.n_heads=3"], "n_heads (3) must be a positive multiple of n_kv_heads"),
        (["model.rope_scaling={factr=2.0}"], "model.rope_scaling: unknown key(s) factr"),
        (["model.rope_scaling=5"], "model.rope_scaling must be a table"),
        (["model.tie_embeddings=1"], "model.tie_embeddings must be bool"),
        (["model.max_seq_len=16"], "model.max_seq_len (16) is shorter than train.seq_len"),
    ],
)
def test_model_section_errors_name_the_key(sets, needle):
    with pytest.raises(RecipeError) as err:
        model_recipe(*sets)
    assert needle in str(err.value)
