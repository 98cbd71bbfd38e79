"""A time-budgeted run schedules its learning rate over the budget it was given: the rate as a function of the
fraction of the budget spent reaches learning_rate × final_lr_fraction at the end; a run killed and resumed
from its checkpoint continues the same curve (same rates, same parameters); the options round-trip through
YAML and bad values fail with one line naming the option. A toy quadratic problem in the real TrainingLoop
with a clock the test controls keeps this fast and exact."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from so3lib.models import make_config
from so3lib.training import RunConfig, TrainingConfig
from so3lib.training.checkpoint import Checkpointer
from so3lib.training.loop import TrainingLoop, step_budget
from so3lib.training.optim import (
    BudgetSchedule,
    budget_driven,
    current_learning_rate,
    injected_learning_rate,
    learning_rate_schedule,
    make_optimizer,
    set_learning_rate,
)
from so3lib.training.state import Progress, TrainState, init_state


@pytest.mark.parametrize(
    "schedule,at_half",
    [
        ("exponential", lambda f: math.sqrt(f)),  # f^p
        ("cosine", lambda f: f + (1 - f) * 0.5),  # f + (1 − f)(1 + cos πp)/2
        ("linear", lambda f: 1 - (1 - f) * 0.5),  # 1 − (1 − f)p
    ],
)
def test_the_rate_follows_the_spent_fraction_of_the_time_budget_to_its_final_value(schedule, at_half):
    cfg = TrainingConfig(
        max_minutes=6,
        max_epochs=None,
        learning_rate=1e-3,
        schedule=schedule,
        final_lr_fraction=0.02,
        warmup_steps=200,
        warmup_start_fraction=1e-2,
    )
    assert budget_driven(cfg)
    sched = BudgetSchedule(cfg, budget_steps=None)
    budget_s = 360.0
    assert sched(0, 0.0) == pytest.approx(1e-5)  # warm-up start: 1e-3 × 1e-2
    assert sched(100, 0.0) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))  # half-way through the warm-up
    assert sched(200, 0.0) == pytest.approx(1e-3)  # warm-up done, nothing of the budget spent
    assert sched(5000, budget_s / 2) == pytest.approx(1e-3 * at_half(0.02))
    assert sched(5000, budget_s) == pytest.approx(1e-3 * 0.02)  # the budget spent: the final value
    assert sched(5000, 2 * budget_s) == pytest.approx(1e-3 * 0.02)  # never below it (the last step overshoots)
    rates = [sched(10_000, t) for t in np.linspace(0, budget_s, 50)]
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))  # strictly decreasing over the budget
    # the step budget counts too when it is the nearer one: 1000 steps of a 1000-step budget is its end
    both = BudgetSchedule(cfg.model_copy(update={"max_steps": 1000}), budget_steps=1000)
    assert both(1000, 1.0) == pytest.approx(1e-3 * 0.02) and both(500, 300.0) == pytest.approx(sched(500, 300.0))


def test_which_runs_are_budget_driven_and_the_step_schedules_are_unchanged():
    assert not budget_driven(TrainingConfig(max_steps=100))  # no wall-clock budget: the step schedule
    assert not budget_driven(TrainingConfig(max_minutes=1, schedule="plateau"))
    assert not budget_driven(TrainingConfig(max_minutes=1, schedule_over="steps"))
    assert budget_driven(TrainingConfig(max_steps=100, schedule="cosine", schedule_over="budget"))
    # the step-driven exponential as before: warm-up from 1 %, then × decay_rate every decay_steps
    old = TrainingConfig(max_steps=10, learning_rate=1e-3, warmup_steps=100, decay_steps=1000, decay_rate=0.1)
    s = learning_rate_schedule(old)
    assert float(s(0)) == pytest.approx(1e-5) and float(s(1100)) == pytest.approx(1e-4, rel=1e-5)
    cos = learning_rate_schedule(old.model_copy(update={"schedule": "cosine", "final_lr_fraction": 0.1}))
    assert float(cos(1100)) == pytest.approx(1e-4, rel=1e-5)  # decay_steps after the warm-up: the final value


def test_the_injected_rate_is_what_the_update_uses():
    """set_learning_rate writes the rate into the state; one Adam step moves each parameter by the rate."""
    cfg = TrainingConfig(max_minutes=1, warmup_steps=0, grad_clip=None)
    opt = make_optimizer(cfg, 10)
    params = {"w": jnp.zeros(3, jnp.float32)}
    state = set_learning_rate(opt.init(params), 0.25)
    assert injected_learning_rate(state) == 0.25 and current_learning_rate(cfg, 7, state) == 0.25
    updates, _ = opt.update({"w": jnp.array([1.0, -2.0, 3.0], jnp.float32)}, state, params)
    np.testing.assert_allclose(np.asarray(updates["w"]), [-0.25, 0.25, -0.25], rtol=1e-4)  # Adam's first step


# ------------------------------------------------------------------ the real loop on a toy problem
TARGETS = np.array([[1.0, -1.0], [2.0, 0.5], [-0.5, 1.5]], np.float32)  # one "batch" each, 3 per epoch


class ToyLoader:
    def __len__(self):
        return len(TARGETS)

    def epoch(self, e, start_batch=0):
        order = np.random.default_rng(e).permutation(len(TARGETS))  # epoch order from (epoch) only, as GraphLoader
        for i in order[start_batch:]:
            yield jnp.asarray(TARGETS[i])


class Recorder:
    """The toy train step; records the learning rate of every update. ``die_at``: raise after that many calls
    (a killed run)."""

    def __init__(self, opt, die_at=None):
        self.rates, self.die_at, self.calls = [], die_at, 0

        @jax.jit
        def step(state, target):
            loss, grads = jax.value_and_grad(lambda p: jnp.sum((p["w"] - target) ** 2))(state.params)
            updates, opt_state = opt.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            return state.replace(params=params, opt_state=opt_state, ema=params, step=state.step + 1), loss, {}

        self.step = step

    def __call__(self, state, target):
        if self.die_at is not None and self.calls == self.die_at:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        self.rates.append(injected_learning_rate(state.opt_state))
        return self.step(state, target)


def _validate(ema):
    err = float(jnp.mean(ema["w"] ** 2))
    return {
        "energy_mae_ev": err,
        "energy_rmse_ev": err,
        "energy_mae_per_atom_ev": err,
        "forces_mae_ev_per_a": err,
        "forces_rmse_ev_per_a": err,
        "mse_energy": err,
        "mse_forces": err,
    }


class Rows(list):
    write = list.append


SECONDS_PER_STEP = 3.0  # the test's clock: 3 s of training per step, whatever the machine does


def _loop(cfg, ckpt_dir, recorder):
    loop = TrainingLoop(
        cfg,
        recorder,
        ToyLoader(),
        validate=_validate,
        learning_rate=lambda step, opt_state: current_learning_rate(cfg, step, opt_state),
        checkpointer=Checkpointer(ckpt_dir),
        metrics=Rows(),
        budget_schedule=BudgetSchedule(cfg, step_budget(cfg, 3)),
        clock=lambda: loop.progress.step * SECONDS_PER_STEP,
    )
    return loop


def _fresh(cfg):
    opt = make_optimizer(cfg, 3)
    params = {"w": jnp.zeros(2, jnp.float32)}
    return opt, init_state(params, opt.init(params))


def test_a_killed_and_resumed_run_continues_the_budget_schedule_exactly(tmp_path):
    cfg = TrainingConfig(
        max_minutes=0.5,  # 30 s of the test's clock: 10 steps
        max_epochs=None,
        learning_rate=0.1,
        schedule="cosine",
        final_lr_fraction=0.05,
        warmup_steps=2,
        grad_clip=None,
        ema_decay=None,
        eval_every_steps=3,
        checkpoint_every_steps=4,
        log_every_steps=3,  # the rate is written at steps 0, 3, 6, ...; the checkpoints at 4, 8, ... fall between
        early_stopping_patience=None,
    )
    opt, state = _fresh(cfg)
    whole = Recorder(opt)
    loop = _loop(cfg, tmp_path / "whole", whole)
    end, progress, timing = loop.run(state, Progress())
    assert progress.stopped == "max_minutes" and progress.step == 11  # 11 × 3 s > 30 s
    assert timing.train_time_s == pytest.approx(33.0) and progress.elapsed_s == pytest.approx(33.0)
    sched = BudgetSchedule(cfg, None)
    written = [s - s % 3 for s in range(11)]  # the step of the last write at or before step s
    assert whole.rates == pytest.approx([sched(m, 3.0 * m) for m in written], rel=1e-6)
    assert whole.rates[0] == pytest.approx(0.1 * 0.01)  # warm-up start
    assert whole.rates[10] == pytest.approx(sched(9, 27.0)) and whole.rates[9] < whole.rates[8]  # a staircase
    last = loop.metrics[-1]  # the evaluation after step 9 reports the rate in the state: the one of update 9
    assert last["step"] == 9 and last["learning_rate"] == pytest.approx(whole.rates[8])

    # the same run killed at step 6 (last checkpoint: step 4, between two writes), then resumed from it
    opt, state = _fresh(cfg)
    killed = Recorder(opt, die_at=6)
    with pytest.raises(KeyboardInterrupt):
        _loop(cfg, tmp_path / "killed", killed).run(state, Progress())
    ckpt = Checkpointer(tmp_path / "killed")
    assert ckpt.latest_step() == 4
    tree, meta = ckpt.restore(state.to_dict())
    resumed_progress = Progress.from_dict(meta)
    assert resumed_progress.elapsed_s == pytest.approx(12.0)  # the training time is in the checkpoint
    resumed = Recorder(opt)
    back = TrainState.from_dict(jax.tree_util.tree_map(jnp.asarray, tree))
    end2, progress2, _ = _loop(cfg, tmp_path / "killed", resumed).run(back, resumed_progress)
    assert progress2.step == 11 and progress2.stopped == "max_minutes"
    assert resumed.rates == whole.rates[4:]  # bit for bit the same rates ...
    np.testing.assert_array_equal(np.asarray(end2.params["w"]), np.asarray(end.params["w"]))  # ... and parameters


def test_several_processes_follow_process_0s_clock(tmp_path):
    """With ``agree`` (a run of several processes) the rate and the time budget follow the training time that
    process 0 gives at every log_every_steps steps, never the local clock, so every process applies the same
    updates. Here process 0's clock is 30 s ahead of the local one."""
    cfg = TrainingConfig(
        max_minutes=1.0,
        max_epochs=None,
        learning_rate=0.1,
        schedule="linear",
        warmup_steps=0,
        grad_clip=None,
        ema_decay=None,
        eval_every_steps=3,
        checkpoint_every_steps=100,
        log_every_steps=2,
        early_stopping_patience=None,
    )
    opt, state = _fresh(cfg)
    rec = Recorder(opt)
    loop = _loop(cfg, tmp_path / "c", rec)
    loop.agree = lambda elapsed_s: elapsed_s + 30.0
    _, progress, _ = loop.run(state, Progress())
    assert progress.stopped == "max_minutes" and progress.step == 12  # agreed 3·12 + 30 > 60 at the 6th check
    sched = BudgetSchedule(cfg, None)
    written = [s - s % 2 for s in range(12)]  # the rate is written at every agreement (every 2 steps)
    agreed = [0.0 if m == 0 else 3.0 * m + 30.0 for m in written]  # process 0's time then
    assert rec.rates == pytest.approx([sched(m, t) for m, t in zip(written, agreed, strict=True)], rel=1e-6)


def test_budget_options_round_trip_through_yaml(tmp_path):
    cfg = RunConfig(
        name="b",
        model=make_config("schnet", n_atom_basis=16, embedding_init_std=1.0),
        training=TrainingConfig(
            max_minutes=6,
            schedule="cosine",
            schedule_over="budget",
            final_lr_fraction=0.03,
            warmup_start_fraction=0.1,
            output_scale_ev=1.0,
            grad_clip=None,
            ema_decay=None,
        ),
    )
    back = RunConfig.from_yaml(cfg.to_yaml(tmp_path / "c.yaml"))
    assert back == cfg
    t = back.training
    assert (t.schedule, t.schedule_over) == ("cosine", "budget")
    assert (t.final_lr_fraction, t.warmup_start_fraction) == (0.03, 0.1)
    assert (t.output_scale_ev, t.grad_clip, t.ema_decay, back.model.embedding_init_std) == (1.0, None, None, 1.0)


@pytest.mark.parametrize(
    "options,words",
    [
        ({"schedule": "plateau", "schedule_over": "budget"}, "schedule_over=budget decays an exponential"),
        ({"final_lr_fraction": 0.0}, "final_lr_fraction"),
        ({"final_lr_fraction": 1.5}, "final_lr_fraction"),
        ({"warmup_start_fraction": 0}, "warmup_start_fraction"),
        ({"schedule_over": "time"}, "schedule_over"),
        ({"output_scale_ev": -1.0}, "output_scale_ev"),
        ({"output_scale_ev": 1.0, "init_from": "runs/x"}, "output_scale_ev applies to a fresh run"),
    ],
)
def test_bad_budget_options_are_named(options, words):
    with pytest.raises(ValueError, match=words):
        TrainingConfig(max_minutes=1, **options)


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--schedule-over", "time"], "--schedule-over: invalid choice 'time'"),
        (["--final-lr-fraction", "0"], "--final-lr-fraction: Input should be greater than 0"),
    ],
)
def test_a_bad_schedule_option_on_the_command_line_is_one_line(flags, words, tmp_path, capsys):
    from so3lib.cli import main

    assert main(["train", "--train", str(tmp_path / "x.npz"), *flags]) == 2
    (err,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err.startswith("so3lib: error:") and words in err, err
