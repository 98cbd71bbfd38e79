"""The training loop and nothing else: steps, the evaluation cadence, model selection, early stopping, budgets, the
checkpoint cadence and the NaN guard. It builds nothing: the step, the loader, the validation, the checkpointer
and the metrics file come from the caller (`so3lib.training.trainer.train`).

An evaluation runs every ``eval_every_steps`` steps (None: at each epoch's end) on the EMA parameters; the one
with the lowest validation loss is kept as ``state.best``. A run stops when it reaches its step or epoch budget,
its minutes, or ``early_stopping_patience`` evaluations without improvement; a checkpoint is written every
``checkpoint_every_steps`` steps and at the stop. A budget-driven learning rate (`BudgetSchedule`) is written
into the optimiser state every ``log_every_steps`` steps, from the step count and the training time summed over
sessions (the checkpoint keeps the rate written last, so a resumed run continues the same staircase).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from so3lib.graph.batching import GraphLoader
from so3lib.training.checkpoint import Checkpointer
from so3lib.training.config import TrainingConfig
from so3lib.training.evaluation import fmt, metric_row, validation_loss
from so3lib.training.optim import BudgetSchedule, injected_paths, set_learning_rate
from so3lib.training.state import Progress, TrainState
from so3lib.training.step import TrainStep

log = logging.getLogger("so3lib.train")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step, the last finite step and the last
    checkpoint."""


class MetricsWriter(Protocol):
    def write(self, row: dict) -> None: ...


MIN_TIMED_STEPS = 5  # fewer timed steps than this give no steps_per_s


@dataclasses.dataclass
class LoopTiming:
    """train_time_s: training time summed over sessions (s); compile_time_s: the first step of this session,
    compilation included; steps_per_s: the later steps of this session, evaluations and checkpoints excluded
    (None when fewer than MIN_TIMED_STEPS were timed)."""

    train_time_s: float
    compile_time_s: float | None
    steps_per_s: float | None


def step_budget(cfg: TrainingConfig, steps_per_epoch: int) -> int | None:
    """The run's steps: the smaller of max_steps and max_epochs × steps_per_epoch (None: minutes only)."""
    budgets = [b for b in (cfg.max_steps, cfg.max_epochs and cfg.max_epochs * steps_per_epoch) if b]
    return min(budgets) if budgets else None


class TrainingLoop:
    """Runs ``train_step`` over ``train_loader`` from ``state``/``progress`` (a fresh start or a restored
    checkpoint).

    Args:
        cfg: the cadences, budgets and patience (``TrainingConfig``).
        train_step: the jitted step (`so3lib.training.step.make_train_step`).
        train_loader: the training batches; ``epoch(e, start_batch)`` replays epoch e from a batch.
        validate: EMA parameters → `evaluate`'s metrics on the validation set.
        learning_rate: (step, opt_state) → the learning rate, for the metrics.
        checkpointer: where checkpoints go (``save(step, tree, json)``, ``latest_step()``).
        metrics: receives one row per evaluation (``write(row)``).
        pbar: a progress bar (``update(n)``, ``set_postfix(**values, refresh=False)``, e.g. tqdm) or None.
        agree: in a run of several processes, ``agree(elapsed_s) -> float`` gives every process process 0's
            training time (wall clocks differ; a collective, so it is asked only every ``log_every_steps``
            steps): the time budget and the budget-driven learning rate follow it. None: the local clock, read
            at every step.
        budget_schedule: the budget-driven learning rate (`so3lib.training.optim.BudgetSchedule`), written
            into the optimiser state before every ``log_every_steps``-th step; None: the optimiser's own step
            schedule.
        clock: seconds (``time.perf_counter``; tests give a clock of their own): the training time t that the
            time budget and the budget-driven schedule read, summed over sessions through ``Progress.elapsed_s``.
    """

    def __init__(
        self,
        cfg: TrainingConfig,
        train_step: TrainStep,
        train_loader: GraphLoader,
        validate: Callable[[Any], dict],
        learning_rate: Callable[[int, Any], float],
        checkpointer: Checkpointer,
        metrics: MetricsWriter,
        pbar: Any = None,
        agree: Callable[[float], float] | None = None,
        budget_schedule: BudgetSchedule | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.cfg = cfg
        self.train_step = train_step
        self.train_loader = train_loader
        self.steps_per_epoch = len(train_loader)
        if self.steps_per_epoch == 0:
            raise ValueError("the training set yields no batch")
        self.budget_steps = step_budget(cfg, self.steps_per_epoch)
        self.validate = validate
        self.learning_rate = learning_rate
        self.checkpointer = checkpointer
        self.metrics = metrics
        self.pbar = pbar
        self.agree = agree
        self.budget_schedule = budget_schedule
        self.clock = clock

    def run(self, state: TrainState, progress: Progress) -> tuple[TrainState, Progress, LoopTiming]:
        """Train until a stop; returns the final state (``best`` holds the selected parameters), the progress
        (``stopped`` says why) and the timings. A finished run stays finished (re-running it is idempotent); a
        run stopped by its budget continues if the budget grew.

        Raises:
            NonFiniteLossError: a training loss is NaN or infinite (checked every ``log_every_steps`` steps,
                before every evaluation and checkpoint, so no checkpoint holds a diverged state).
        """
        self.state, self.progress = state, progress
        self._elapsed0 = progress.elapsed_s
        self._agreed_elapsed = progress.elapsed_s  # several processes: process 0's time at the last agreement
        self._lr_paths = None  # where the budget schedule writes the learning rate in the optimiser state
        self._pending: list[tuple[int, int, jax.Array]] = []  # (step, epoch, loss on the device), unchecked
        self._loss_window: list[float] = []  # checked losses since the last evaluation
        self._t_other = 0.0  # evaluation and checkpoint time inside the timed window, excluded from steps_per_s
        self._compile_time_s, self._timed_from, self._steps_timed = None, None, 0
        p = progress
        p.stopped = "early_stopping" if p.stopped == "early_stopping" else None
        if self.budget_steps is not None and p.step >= self.budget_steps:
            p.stopped = p.stopped or "max_steps"
        self._t_loop = self.clock()
        while p.stopped is None:
            if p.batch_in_epoch >= self.steps_per_epoch:  # resumed with a larger batch: that epoch is over
                log.warning(
                    "resuming at batch %d of epoch %d, but an epoch now has %d batches (another batch size?): "
                    "starting epoch %d",
                    p.batch_in_epoch,
                    p.epoch,
                    self.steps_per_epoch,
                    p.epoch + 1,
                )
                p.epoch, p.batch_in_epoch = p.epoch + 1, 0
            for graph in self.train_loader.epoch(p.epoch, p.batch_in_epoch):
                self._step(graph)
                if p.stopped:
                    break
        self._check_losses()
        jax.block_until_ready(self.state.params)
        t_end = time.perf_counter()
        train_time_s = self._elapsed()
        if p.best_step < 0:  # no evaluation ran yet: evaluate once so a best model exists
            self._evaluate()
        self._save()
        timed_s = t_end - self._timed_from - self._t_other if self._timed_from else 0.0
        timing = LoopTiming(
            train_time_s=train_time_s,
            compile_time_s=self._compile_time_s,
            # absent when too few steps were timed to measure (a short run), never a division by almost zero
            steps_per_s=self._steps_timed / timed_s
            if self._timed_from and self._steps_timed >= MIN_TIMED_STEPS and timed_s > 0
            else None,
        )
        return self.state, p, timing

    def _step(self, graph) -> None:
        """One update, then what falls due at its step: loss check, epoch end, evaluation, stop, checkpoint."""
        cfg, p = self.cfg, self.progress
        if self.budget_schedule is not None and p.step % cfg.log_every_steps == 0:
            # between these steps the rate stays as written, also in a checkpoint: a resumed run continues it
            t = self._elapsed() if self.agree is None else self._agreed_elapsed
            lr = self.budget_schedule(p.step, t)
            if self._lr_paths is None:
                self._lr_paths = injected_paths(self.state.opt_state)
            self.state = self.state.replace(opt_state=set_learning_rate(self.state.opt_state, lr, self._lr_paths))
        t0 = time.perf_counter()
        self.state, loss, _ = self.train_step(self.state, graph)
        if self._compile_time_s is None:
            jax.block_until_ready(loss)
            self._compile_time_s = time.perf_counter() - t0
            self._timed_from = time.perf_counter()
        else:
            self._steps_timed += 1
        p.step += 1
        p.batch_in_epoch += 1
        self._pending.append((p.step, p.epoch, loss))
        if self.pbar is not None:
            self.pbar.update(1)
        if p.step % cfg.log_every_steps == 0:
            self._check_losses()
        at_epoch_end = p.batch_in_epoch == self.steps_per_epoch
        if at_epoch_end:
            p.epoch, p.batch_in_epoch = p.epoch + 1, 0
        if (cfg.eval_every_steps and p.step % cfg.eval_every_steps == 0) or (not cfg.eval_every_steps and at_epoch_end):
            self._evaluate()
        if self.budget_steps is not None and p.step >= self.budget_steps:
            p.stopped = p.stopped or "max_steps"
        if cfg.max_minutes and (self.agree is None or p.step % cfg.log_every_steps == 0):
            elapsed = self._elapsed()
            if self.agree is not None:
                elapsed = self._agreed_elapsed = float(self.agree(elapsed))
            if cfg.max_minutes and elapsed > 60 * cfg.max_minutes:
                p.stopped = p.stopped or "max_minutes"
        if p.step % cfg.checkpoint_every_steps == 0 or p.stopped:
            self._save()

    def _elapsed(self) -> float:
        return self._elapsed0 + self.clock() - self._t_loop

    def _check_losses(self) -> None:
        """Bring the pending losses to the host; the first non-finite one stops the run."""
        p = self.progress
        for step, epoch, loss_dev in self._pending:
            loss = float(loss_dev)
            if not math.isfinite(loss):
                self._pending.clear()
                ckpt = self.checkpointer.latest_step()
                raise NonFiniteLossError(
                    f"non-finite training loss ({loss}) at step {step} (epoch {epoch}): training stopped. "
                    + (
                        f"The last finite loss was at step {p.last_good_step}; "
                        if p.last_good_step is not None
                        else "No step had a finite loss; "
                    )
                    + (
                        f"the last checkpoint is at step {ckpt} in {self.checkpointer.directory}. "
                        if ckpt is not None
                        else "there is no checkpoint. "
                    )
                    + "Lower the learning rate or check the data."
                )
            p.last_good_step = step
            self._loss_window.append(loss)
        self._pending.clear()
        if self._loss_window and self.pbar is not None:
            self.pbar.set_postfix(loss=f"{self._loss_window[-1]:.4g}", refresh=False)

    def _evaluate(self) -> None:
        """Validate the EMA parameters, write a metrics row, keep the best, count towards early stopping."""
        t_eval = time.perf_counter()
        self._check_losses()
        p, cfg = self.progress, self.cfg
        m = self.validate(self.state.ema)
        val_loss = validation_loss(m, cfg.beta)
        if val_loss is None:
            raise ValueError("the validation set has neither energy nor force labels: nothing to select a model on")
        p.n_evals += 1
        lr = self.learning_rate(p.step, self.state.opt_state)
        row = {
            "step": p.step,
            "epoch": p.epoch,
            "time_s": round(self._elapsed(), 3),
            "learning_rate": lr,
            "train_loss": float(np.mean(self._loss_window)) if self._loss_window else "",
            "val_loss": val_loss,
            **metric_row(m),
        }
        self.metrics.write(row)
        self._loss_window.clear()
        if val_loss < p.best_val_loss:
            p.best_val_loss, p.best_step, p.bad_evals = val_loss, p.step, 0
            self.state = self.state.replace(best=jax.tree_util.tree_map(jnp.copy, self.state.ema))
        else:
            p.bad_evals += 1
        log.info(
            "step %d epoch %d: val energy MAE %s meV, forces MAE %s meV/Å, loss %.4g (best %.4g @ %d), lr %.3g",
            p.step,
            p.epoch,
            fmt(row["val_energy_mae_mev"]),
            fmt(row["val_forces_mae_mev_per_a"]),
            val_loss,
            p.best_val_loss,
            p.best_step,
            lr,
        )
        if self.pbar is not None:
            self.pbar.set_postfix(
                loss=f"{row['train_loss'] or float('nan'):.4g}",
                val_F=f"{fmt(row['val_forces_mae_mev_per_a'], '.1f')}meV/Å",
                refresh=False,
            )
        if cfg.early_stopping_patience and p.bad_evals >= cfg.early_stopping_patience:
            p.stopped = "early_stopping"
        self._t_other += time.perf_counter() - t_eval

    def _save(self) -> None:
        t_save = time.perf_counter()
        self._check_losses()
        self.progress.elapsed_s = self._elapsed()
        self.checkpointer.save(self.progress.step, self.state.to_dict(), self.progress.to_dict())
        self._t_other += time.perf_counter() - t_save
