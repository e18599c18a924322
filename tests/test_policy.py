"""BestEpochPolicy driven by scripted score sequences, in the manner of Lightning's EarlyStopping tests."""
from __future__ import annotations

import json
import math
import pickle
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from lora_monitor.policy import PRESETS, BestEpochPolicy, Decision, DvarRule, EpochResult, get_preset, parse_bound

NAN = math.nan
INF = math.inf
REPO = Path(__file__).resolve().parents[1]


def run(values, *, higher_is_better, min_delta=0.0, patience=None, policy=None, first_epoch=0, **kwargs):
    """Feed one value per epoch (epochs from first_epoch) until the policy says stop, as a trainer would."""
    policy = policy or BestEpochPolicy("score", higher_is_better=higher_is_better, min_delta=min_delta,
                                       patience=patience, **kwargs)
    for epoch, value in enumerate(values, start=first_epoch):
        decision = policy.update(epoch, {"score": [value]})
        if decision.should_stop:
            break
    return policy


# (values, higher_is_better, min_delta, patience, expected_best_epoch, expected_stop_epoch); epochs from 0.
TABLE = [
    # lower is better (mode min)
    ([5, 4, 3, 2, 1], False, 0.0, 2, 4, None),
    ([1, 2, 3, 4, 5], False, 0.0, 2, 0, 2),
    ([6, 5, 5, 5, 5, 5], False, 0.0, 3, 1, 4),  # Lightning's own table
    ([6, 5, 4, 4, 3, 3], False, 0.0, 1, 2, 3),  # Lightning's own table
    ([6, 5, 6, 5, 5, 5], False, 0.0, 3, 1, 4),  # Lightning's own table
    ([3, 2, 2, 2, 1], False, 0.0, 3, 4, None),  # two ties, then an improvement resets the wait
    ([2, 2, 2, 2], False, 0.0, None, 0, None),  # ties: the earliest epoch stays best, never stop
    ([1.0, 0.75, 0.5], False, 0.25, None, 2, None),  # 0.75 beats 1.0 by exactly min_delta: not an improvement
    ([1.0, 0.75, 0.75], False, 0.25, 2, 0, 2),
    ([1.0, 0.74], False, 0.25, None, 1, None),  # slightly more than min_delta: an improvement
    ([1, 2], False, 0.0, 1, 0, 1),  # patience 1: the first non-improving evaluation stops
    ([1, 0.5, 0.5], False, 0.0, 1, 1, 2),
    # higher is better (mode max)
    ([1, 2, 3, 4], True, 0.0, 2, 3, None),
    ([3, 2, 1, 0], True, 0.0, 2, 0, 2),
    ([0.5, 0.75, 1.0], True, 0.25, None, 2, None),  # exactly min_delta is not an improvement
    ([0.5, 0.76], True, 0.25, None, 1, None),
    ([2, 2, 2], True, 0.0, 2, 0, 2),
    ([1, 0], True, 0.0, 1, 0, 1),
    # NaN / inf are the worst score
    ([NAN, 2, 3], False, 0.0, 3, 1, None),
    ([NAN, 0.5, 0.4], True, 0.0, 3, 1, None),
    ([INF, 1], False, 0.0, 3, 1, None),
    ([1, -INF, 2], False, 0.0, 3, 0, None),  # -inf would be "best" in min mode if taken at face value
    ([1.0, INF, 0.5], True, 0.0, 3, 0, None),  # +inf would be "best" in max mode if taken at face value
    ([NAN, NAN, NAN, 1], False, 0.0, 2, None, 1),  # nothing eligible: patience still runs out
    ([1, NAN, NAN, 0.5], False, 0.0, 3, 3, None),
]


@pytest.mark.parametrize("values,higher_is_better,min_delta,patience,expected_best,expected_stop", TABLE)
def test_scripted_sequences(values, higher_is_better, min_delta, patience, expected_best, expected_stop):
    policy = run(values, higher_is_better=higher_is_better, min_delta=min_delta, patience=patience)
    assert policy.best_epoch == expected_best
    assert policy.stopped_epoch == expected_stop
    assert policy.should_stop == (expected_stop is not None)
    assert policy.mode == ("max" if higher_is_better else "min")
    if expected_best is not None:
        assert policy.best_value == float(values[expected_best])
    expected_epochs = len(values) if expected_stop is None else expected_stop + 1
    assert [result.epoch for result in policy.history] == list(range(expected_epochs))


def test_non_finite_epoch_value_is_the_worst_possible():
    policy = BestEpochPolicy("brisque", higher_is_better=False)
    decision = policy.update(0, {"brisque": [10.0, NAN, 12.0]})
    assert not decision.is_best and decision.best_epoch is None
    result = policy.history[0]
    assert result.value == INF and not result.eligible
    assert "prompt(s) [1]" in result.note
    assert policy.update(1, {"brisque": [50.0, 60.0, 70.0]}).is_best

    maximise = BestEpochPolicy("ssim", higher_is_better=True)
    maximise.update(0, {"ssim": [0.5, INF]})
    assert maximise.history[0].value == -INF and maximise.best_epoch is None


@pytest.mark.parametrize(
    "aggregate,expected_best,expected_values",
    [
        ("mean", 1, [4.0, 3.0]),
        ("median", 0, [1.0, 3.0]),
        ("min", 0, [1.0, 2.0]),
        ("max", 1, [10.0, 4.0]),
    ],
)
def test_aggregation_over_prompts(aggregate, expected_best, expected_values):
    policy = BestEpochPolicy("brisque", higher_is_better=False, aggregate=aggregate)
    policy.update(0, {"brisque": [1.0, 1.0, 10.0]})
    policy.update(1, {"brisque": [2.0, 3.0, 4.0]})
    assert policy.best_epoch == expected_best
    assert [result.value for result in policy.history] == expected_values


def test_aggregates_hold_every_metric_and_bare_numbers_count_as_one_prompt():
    policy = BestEpochPolicy("brisque", higher_is_better=False)
    policy.update(3, {"brisque": 20.0, "ssim": [0.5, 0.7], "other": [1.0, NAN]}, step=300)
    result = policy.history[0]
    assert result.aggregates["brisque"] == 20.0
    assert result.aggregates["ssim"] == pytest.approx(0.6)
    assert math.isnan(result.aggregates["other"])  # non-finite in an unmonitored, unbounded metric: NaN, no harm
    assert result.eligible and result.step == 300 and policy.best_step == 300


def bounded_policy(patience=2):
    return BestEpochPolicy("brisque", higher_is_better=False, patience=patience, bounds={"ssim": (0.3, 0.95)})


def test_bounds_keep_out_of_bounds_epochs_from_being_best():
    policy = bounded_policy()
    brisque = [5.0, 3.0, 1.0, 0.5, 4.0]
    ssim = [0.9, 0.8, 0.99, 0.1, 0.7]  # epoch 2 above the upper bound, epoch 3 below the lower one
    decisions = [policy.update(epoch, {"brisque": [b], "ssim": [s]}) for epoch, (b, s) in enumerate(zip(brisque, ssim))
                 if not policy.should_stop]
    assert policy.best_epoch == 1 and policy.best_value == 3.0
    assert policy.stopped_epoch == 3  # ineligible evaluations count as non-improving
    assert [d.is_best for d in decisions] == [True, True, False, False]
    assert "above the upper bound 0.95" in decisions[2].reason
    assert "below the lower bound 0.3" in decisions[3].reason
    assert [result.epoch for result in policy.ranked()] == [1, 0]


def test_bounds_are_inclusive_and_may_be_open():
    policy = BestEpochPolicy("brisque", higher_is_better=False, bounds={"ssim": (None, 0.95)})
    assert policy.update(0, {"brisque": [2.0], "ssim": [0.95]}).is_best
    assert policy.update(1, {"brisque": [1.0], "ssim": [-5.0]}).is_best
    assert not policy.update(2, {"brisque": [0.5], "ssim": [0.96]}).is_best


def test_bound_metric_with_nan_is_ineligible():
    policy = BestEpochPolicy("brisque", higher_is_better=False, bounds={"ssim": (0.3, None)})
    decision = policy.update(0, {"brisque": [1.0], "ssim": [0.5, NAN]})
    assert not decision.is_best and not policy.history[0].eligible
    assert "ssim is NaN or infinite" in decision.reason


def test_missing_metrics_are_errors_listing_the_present_ones():
    policy = BestEpochPolicy("brisque", higher_is_better=False, bounds={"ssim": (0.3, None)})
    with pytest.raises(ValueError, match=r"monitored metric 'brisque' is missing .*present: \['clip', 'ssim'\]"):
        policy.update(0, {"ssim": [0.5], "clip": [0.2]})
    with pytest.raises(ValueError, match=r"bounded metric 'ssim' is missing .*present: \['brisque'\]"):
        policy.update(0, {"brisque": [1.0]})
    with pytest.raises(ValueError, match="empty"):
        policy.update(0, {"brisque": [], "ssim": [0.5]})
    assert policy.history == []  # failed updates record nothing


@pytest.mark.parametrize("second_epoch", [3, 2])
def test_epochs_must_increase(second_epoch):
    policy = BestEpochPolicy("brisque", higher_is_better=False)
    policy.update(3, {"brisque": [1.0]})
    with pytest.raises(ValueError, match=f"epoch {second_epoch} is not after the last evaluated epoch 3"):
        policy.update(second_epoch, {"brisque": [0.5]})
    assert len(policy.history) == 1 and policy.best_epoch == 3


def test_update_after_stop_keeps_the_first_stop_and_still_tracks_best():
    policy = run([1, 2, 3], higher_is_better=False, patience=2)
    assert policy.stopped_epoch == 2
    reason = policy.stop_reason
    decision = policy.update(3, {"score": [0.5]})
    assert decision.should_stop and decision.is_best
    assert policy.stopped_epoch == 2 and policy.stop_reason == reason
    assert "Already stopped at epoch 2" in decision.reason
    assert policy.best_epoch == 3


def test_reasons_are_sentences():
    policy = BestEpochPolicy("brisque", higher_is_better=False, min_delta=0.05, patience=3)
    reasons = [policy.update(epoch, {"brisque": [v, v, v, v]}).reason
               for epoch, v in enumerate([13.0, 12.34, 12.5, 12.3, 12.4], start=1)]
    assert reasons[0] == "brisque (mean over 4 prompts) is 13 at epoch 1, the first eligible value; new best."
    assert reasons[1] == "brisque (mean over 4 prompts) improved from 13 (epoch 1) to 12.34 at epoch 2; new best."
    assert "not better than the best 12.34 (epoch 2) by more than 0.05" in reasons[2]
    assert "1 of 3 evaluation(s) without improvement" in reasons[2]
    assert policy.stop_reason == ("Stopping at epoch 5: brisque (mean over 4 prompts) did not improve by more than "
                                  "0.05 for 3 evaluation(s); best 12.34 at epoch 2.")
    assert reasons[4].endswith(policy.stop_reason)
    assert all(reason[0].isupper() or reason.startswith("brisque") for reason in reasons)
    assert all(reason.endswith(".") for reason in reasons)


def test_the_validation_loss_is_counted_in_held_out_images_not_prompts():
    policy = BestEpochPolicy("val_loss", higher_is_better=False)
    assert policy.update(1, {"val_loss": [0.2, 0.3, 0.25], "brisque": [10.0]}).reason.startswith(
        "val_loss (mean over 3 held-out images) is 0.25 at epoch 1"
    )


def test_ranked_orders_eligible_epochs_best_first_ties_earliest():
    policy = BestEpochPolicy("ssim", higher_is_better=True)
    for epoch, value in enumerate([0.5, 0.7, NAN, 0.7, 0.6]):
        policy.update(epoch, {"ssim": [value]})
    assert [r.epoch for r in policy.ranked()] == [1, 3, 4, 0]
    assert [r.epoch for r in policy.ranked(2)] == [1, 3]
    assert policy.ranked(0) == []
    assert all(isinstance(r, EpochResult) for r in policy.ranked())
    with pytest.raises(ValueError, match="k must be >= 0"):
        policy.ranked(-1)


def test_describe_is_json_and_complete():
    policy = BestEpochPolicy("brisque", higher_is_better=False, min_delta=0.5, patience=4, aggregate="median",
                             bounds={"ssim": (0.3, None)})
    described = json.loads(json.dumps(policy.describe(), allow_nan=False))
    assert described == {"metric": "brisque", "higher_is_better": False, "mode": "min", "min_delta": 0.5,
                         "patience": 4, "aggregate": "median", "bounds": {"ssim": [0.3, None]}, "unit": "epoch", "dvar": None}


def test_step_unit_words_the_decisions_and_round_trips():
    policy = BestEpochPolicy("brisque", higher_is_better=False, patience=1, unit="step")
    assert "at step 100" in policy.update(100, {"brisque": [5.0]}, step=100).reason
    decision = policy.update(200, {"brisque": [6.0]}, step=200)
    assert decision.should_stop and "Stopping at step 200" in decision.reason and "(step 100)" in decision.reason
    with pytest.raises(ValueError, match="step 150 is not after the last evaluated step 200"):
        policy.update(150, {"brisque": [1.0]})
    resumed = BestEpochPolicy("brisque", higher_is_better=False, patience=1, unit="step")
    resumed.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    assert (resumed.best_epoch, resumed.best_step, resumed.stopped_epoch) == (100, 100, 200)
    epochs = BestEpochPolicy("brisque", higher_is_better=False, patience=1)
    with pytest.raises(ValueError, match="unit: saved 'step', now 'epoch'"):
        epochs.load_state_dict(policy.state_dict())
    with pytest.raises(ValueError, match="unit can be 'epoch', 'step', got 'minute'"):
        BestEpochPolicy("brisque", higher_is_better=False, unit="minute")


def test_a_state_saved_before_units_existed_loads_as_epochs():
    policy = BestEpochPolicy("brisque", higher_is_better=False)
    policy.update(1, {"brisque": [5.0]})
    state = policy.state_dict()
    del state["settings"]["unit"]
    fresh = BestEpochPolicy("brisque", higher_is_better=False)
    fresh.load_state_dict(state)
    assert fresh.best_epoch == 1


# A run with NaN (encoded through JSON), a bound, ties and a stop.
RESUME_BRISQUE = [5.0, NAN, 3.0, 3.0, 2.0, 2.5, 2.0, 4.0, 1.0]
RESUME_SSIM = [0.9, 0.9, 0.9, 0.9, 0.99, 0.9, 0.9, 0.9, 0.9]


def resume_policy():
    return BestEpochPolicy("brisque", higher_is_better=False, min_delta=0.25, patience=3, bounds={"ssim": (0.3, 0.95)})


def feed(policy, epochs):
    for epoch in epochs:
        if policy.should_stop:
            break
        policy.update(epoch, {"brisque": [RESUME_BRISQUE[epoch], 1.0], "ssim": [RESUME_SSIM[epoch]]}, step=10 * epoch)
    return policy


def summary(policy):
    return (policy.best_epoch, policy.best_value, policy.best_step, policy.stopped_epoch, policy.stop_reason,
            policy.wait_count, [(r.epoch, r.step, r.eligible, r.note, repr(r.value), repr(r.aggregates))
                                for r in policy.history])


@pytest.mark.parametrize("split", range(1, 6))
@pytest.mark.parametrize("channel", ["json", "pickle", "object-pickle"])
def test_resume_mid_run_matches_uninterrupted(split, channel):
    uninterrupted = feed(resume_policy(), range(len(RESUME_BRISQUE)))
    # epoch 1 NaN, epoch 3 a tie, epoch 4 out of bounds, epoch 5 better by exactly min_delta: stop at 5
    assert uninterrupted.stopped_epoch == 5 and uninterrupted.best_epoch == 2

    first = feed(resume_policy(), range(split))
    if channel == "json":
        resumed = resume_policy()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict(), allow_nan=False)))
    elif channel == "pickle":
        resumed = resume_policy()
        resumed.load_state_dict(pickle.loads(pickle.dumps(first.state_dict())))
    else:
        resumed = pickle.loads(pickle.dumps(first))
    feed(resumed, range(split, len(RESUME_BRISQUE)))
    assert summary(resumed) == summary(uninterrupted)


def test_load_state_dict_names_the_settings_that_differ():
    saved = feed(resume_policy(), range(3)).state_dict()
    other = BestEpochPolicy("brisque", higher_is_better=False, min_delta=0.25, patience=5, bounds={"ssim": (0.3, 0.9)})
    with pytest.raises(ValueError) as error:
        other.load_state_dict(saved)
    message = str(error.value)
    assert "patience: saved 3, now 5" in message
    assert "bounds:" in message and "min_delta" not in message
    assert other.history == []
    with pytest.raises(ValueError, match="not a BestEpochPolicy state"):
        resume_policy().load_state_dict({"version": 99})


def test_decision_mirrors_the_policy():
    policy = BestEpochPolicy("ssim", higher_is_better=True, patience=1)
    first = policy.update(0, {"ssim": [0.5]})
    assert first == Decision(epoch=0, is_best=True, should_stop=False, reason=first.reason, best_epoch=0, best_value=0.5)
    second = policy.update(1, {"ssim": [0.4]})
    assert (second.is_best, second.should_stop, second.best_epoch) == (False, True, 0)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(metric="brisque", higher_is_better=False, mode="max"),
         r"mode 'max' contradicts metric 'brisque': lower is better, which means mode 'min'"),
        (dict(metric="ssim", higher_is_better=True, mode="min"),
         r"mode 'min' contradicts metric 'ssim': higher is better, which means mode 'max'"),
        (dict(higher_is_better=False, mode="best"), r"mode can be 'min', 'max' or None"),
        (dict(higher_is_better=False, patience=0), r"patience must be an integer >= 1 or None.*got 0"),
        (dict(higher_is_better=False, patience=-2), r"patience must be an integer >= 1 or None.*got -2"),
        (dict(higher_is_better=False, patience=2.5), r"patience must be an integer, got 2.5"),
        (dict(higher_is_better=False, min_delta=-0.1), r"min_delta must be >= 0, got -0.1"),
        (dict(higher_is_better=False, min_delta=NAN), r"min_delta must be a finite number >= 0, got nan"),
        (dict(higher_is_better=False, min_delta=INF), r"min_delta must be a finite number >= 0, got inf"),
        (dict(higher_is_better=False, aggregate="avg"), r"aggregate can be 'mean', 'median', 'min', 'max', got 'avg'"),
        (dict(higher_is_better=False, bounds={"ssim": (0.9, 0.3)}), r"lower bound 0.9 is above upper bound 0.3"),
        (dict(higher_is_better=False, bounds={"ssim": 0.3}), r"bounds\['ssim'\] must be a pair"),
        (dict(higher_is_better=False, bounds={"ssim": (NAN, None)}), r"lower bound must be a finite number, 'Fx' \(relative to the base\) or None"),
        (dict(higher_is_better=False, bounds={"ssim": ("0.9", None)}), r"a relative bound is a factor and 'x'"),
        (dict(higher_is_better=False, dvar="yes"), r"dvar must be a DvarRule"),
        (dict(higher_is_better="no"), r"higher_is_better must be True or False"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        BestEpochPolicy(**kwargs)


def test_explicit_mode_that_agrees_is_accepted():
    assert BestEpochPolicy("ssim", higher_is_better=True, mode="max").mode == "max"
    assert BestEpochPolicy("brisque", higher_is_better=False, mode="min").mode == "min"


def test_policy_imports_without_torch_or_numpy():
    code = "import sys, lora_monitor.policy; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    output = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert output.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("ssim=0.3:0.95", ("ssim", (0.3, 0.95))), ("ssim=0.3:", ("ssim", (0.3, None))), ("pyiqa:niqe=:5", ("pyiqa:niqe", (None, 5.0)))],
)
def test_parse_bound_reads_command_line_bounds(text, expected):
    from lora_monitor.policy import parse_bound

    assert parse_bound(text) == expected


@pytest.mark.parametrize("text", ["ssim", "ssim=0.3", "=0.3:1", "ssim=a:1"])
def test_parse_bound_rejects_malformed_bounds(text):
    from lora_monitor.policy import parse_bound

    with pytest.raises(ValueError, match="--bound"):
        parse_bound(text)


# ----------------------------------------------------------------- bounds relative to the base model
def test_relative_bound_multiplies_the_base_value_and_says_so():
    policy = BestEpochPolicy("likeness", higher_is_better=True, bounds={"adherence": ("0.9x", None)})
    assert policy.needs_base
    with pytest.raises(ValueError, match=r"relative to the base model's adherence, which is not known"):
        policy.update(1, {"likeness": [0.5], "adherence": [0.3]})
    assert policy.history == []  # the failed update changed nothing
    policy.set_base({"adherence": 0.30, "likeness": 0.2})
    low = policy.update(1, {"likeness": [0.9], "adherence": [0.26]})  # 0.26 < 0.9 * 0.30 = 0.27
    assert not low.is_best and "below the lower bound 0.9x base (0.3) = 0.27" in low.reason
    ok = policy.update(2, {"likeness": [0.6], "adherence": [0.28]})
    assert ok.is_best and ok.best_epoch == 2


def test_relative_bound_of_a_negative_base_stays_on_the_same_side():
    """0.9x of a base of -0.3 allows 10% worse (-0.33), never asks for 10% better (-0.27)."""
    policy = BestEpochPolicy("likeness", higher_is_better=True, bounds={"adherence": ("0.9x", "1.5x")})
    policy.set_base({"adherence": -0.3})
    assert policy.update(1, {"likeness": [0.5], "adherence": [-0.32]}).is_best
    assert "below the lower bound 0.9x base (-0.3) = -0.33" in policy.update(2, {"likeness": [0.9], "adherence": [-0.34]}).reason
    assert "above the upper bound 1.5x base (-0.3) = -0.15" in policy.update(3, {"likeness": [0.9], "adherence": [-0.1]}).reason


def test_relative_bound_and_base_round_trip_through_json():
    policy = BestEpochPolicy("likeness", higher_is_better=True, bounds={"diversity": ("0.8x", "2x")})
    policy.set_base({"diversity": 0.5})
    policy.update(1, {"likeness": [0.4], "diversity": [0.45]})
    restored = BestEpochPolicy("likeness", higher_is_better=True, bounds={"diversity": ("0.8x", "2x")})
    restored.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    assert restored.base == {"diversity": 0.5} and restored.describe()["bounds"] == {"diversity": ["0.8x", "2x"]}
    assert not restored.update(2, {"likeness": [0.9], "diversity": [0.39]}).is_best  # 0.39 < 0.8 * 0.5
    other = BestEpochPolicy("likeness", higher_is_better=True, bounds={"diversity": ("0.7x", "2x")})
    with pytest.raises(ValueError, match=r"bounds: saved .*0.8x"):
        other.load_state_dict(policy.state_dict())


def test_parse_bound_reads_relative_sides():
    assert parse_bound("adherence=0.9x:") == ("adherence", ("0.9x", None))
    assert parse_bound("ssim=0.3:1.5x") == ("ssim", (0.3, "1.5x"))
    with pytest.raises(ValueError, match=r"factors of the base value such as 0.9x"):
        parse_bound("ssim=abc:")


# ----------------------------------------------------------------- DVAR
def test_dvar_ratio_is_window_variance_over_overall_variance():
    rule = DvarRule(window=3, threshold=0.15)
    values = [1.0, 0.6, 0.4, 0.41, 0.40, 0.405]
    assert rule.ratio(values[:3]) is None  # needs more than `window` values
    expected = statistics.pvariance(values[-3:]) / statistics.pvariance(values)
    assert rule.ratio(values) == pytest.approx(expected)
    assert rule.ratio([1.0, 1.0, 1.0, 1.0]) is None  # a loss that never moved does not stop
    assert rule.ratio([1.0, 0.5, 0.4, float("nan"), 0.4]) is None


def test_dvar_stops_once_the_loss_flattens_and_not_before():
    policy = BestEpochPolicy("val_loss", higher_is_better=False, dvar=DvarRule(window=3, threshold=0.15))
    losses = [1.0, 0.7, 0.5, 0.45, 0.44, 0.437, 0.436]
    stops = [policy.update(epoch, {"val_loss": [loss]}).should_stop for epoch, loss in enumerate(losses, 1)]
    ratios = [DvarRule(window=3, threshold=0.15).ratio(losses[:n]) for n in range(1, len(losses) + 1)]
    first = next(i for i, r in enumerate(ratios) if r is not None and r < 0.15)
    assert stops == [i >= first for i in range(len(losses))] and 3 <= first < len(losses) - 1
    assert policy.stopped_epoch == first + 1 and "by DVAR" in policy.stop_reason and "Voronov" not in policy.stop_reason
    assert policy.best_epoch == len(losses)  # still improving slightly: best is the latest, stop is DVAR's


def test_dvar_metric_must_be_scored():
    policy = BestEpochPolicy("brisque", higher_is_better=False, dvar=DvarRule())
    with pytest.raises(ValueError, match=r"DVAR metric 'val_loss' is missing"):
        policy.update(1, {"brisque": [3.0]})


def test_presets_name_their_metrics_and_rules():
    for name, preset in PRESETS.items():
        assert preset.metric in preset.metrics and all(metric in preset.metrics for metric in preset.bounds)
        assert get_preset(name) is preset and preset.rule.startswith("best = ")
    assert PRESETS["likeness"].bounds == {"adherence": ("0.9x", None), "diversity": ("0.8x", None)}
    with pytest.raises(ValueError, match=r"unknown policy preset 'likenes'; available: quality, likeness, loss"):
        get_preset("likenes")
    with pytest.warns(DeprecationWarning, match=r"PolicyPreset\.monitor is deprecated; use PolicyPreset\.metric"):
        assert PRESETS["loss"].monitor == "val_loss"
