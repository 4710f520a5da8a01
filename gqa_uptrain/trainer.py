"""The training loop: run steps, keep metrics on device, log, evaluate, checkpoint, keep the best, stop on a signal.

Host syncs. The jitted step runs asynchronously; the host only waits for the device where it needs a value:
- every LOG_EVERY steps (and the last step): the metrics accumulated on device since the previous log step are
  fetched in one transfer and written (metrics.jsonl, TensorBoard, the progress bar, the callback);
- before every checkpoint save (periodic, keep-best, on a stop signal, the final one): one on-device check that the
  parameters and optimiser state are finite (recovery.all_finite);
- every EVAL_EVERY steps: the eval losses.
Each step adds its metrics to an on-device accumulator (a tiny jitted sum) instead of being fetched: T5X's trainer
does the same (`BaseTrainer.train` fetches the merged metrics once per summary period).

Non-finite loss. The accumulator also records the first step whose loss, objective or gradient norm was NaN/Inf.
It is read at every host sync above, so a NaN at step k stops the run at the first log step, save or eval at or
after k, whichever comes first, with an error naming step k and the last good checkpoint. Nothing is saved after
step k: a save between k and the next log step sees the record and refuses, and the finiteness check refuses any
non-finite state regardless. Steps after k until the detection are computed and discarded.

Preemption. A stop signal (gqa_uptrain/preemption.py) is looked for after every step in a single-process run (a flag
read, no sync) and at log steps in a multi-process run (where agreeing on it is a collective, so every process
checks at the same steps and stops at the same one); the run then saves the current step and raises Preempted.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gqa_uptrain import preemption
from gqa_uptrain import recovery
from gqa_uptrain.metrics import MetricWriter, has_record
from gqa_uptrain.run_checkpoints import RunCheckpoints
from gqa_uptrain.train_state import RunState, global_from_host

if TYPE_CHECKING:
    from gqa_uptrain.train import TrainConfig

# Train-step metrics averaged per target token over a log period (the step reports them per token of its batch).
TOKEN_MEAN_KEYS = ("loss", "z_loss", "accuracy")
# Averaged per step: the optimisation objective, gradient norm, learning rate and target tokens per step.
STEP_MEAN_KEYS = ("objective", "grad_norm", "learning_rate", "target_tokens")
_NO_STEP = -1


def stop_check_every_step() -> bool:
    """Whether the loop looks for a stop signal after every step (one process: a flag read) or only at log steps
    (several processes: agreeing on it is a collective, a host sync)."""
    return jax.process_count() == 1


class NonFiniteLossError(ValueError):
    """Training produced a NaN/Inf loss or gradient; the last good checkpoint is kept."""


def _empty_accumulator() -> dict[str, jax.Array]:
    acc = {k: jnp.zeros((), jnp.float32) for k in (*TOKEN_MEAN_KEYS, *STEP_MEAN_KEYS)}
    # The newest step's own values: a one-step period logs exactly them (sums of loss x tokens / tokens round).
    acc.update({f"last_{k}": jnp.zeros((), jnp.float32) for k in (*TOKEN_MEAN_KEYS, *STEP_MEAN_KEYS)})
    acc.update(steps=jnp.zeros((), jnp.int32), first_nonfinite_step=jnp.full((), _NO_STEP, jnp.int32),
               nonfinite_loss=jnp.zeros((), jnp.float32), nonfinite_grad_norm=jnp.zeros((), jnp.float32))
    return acc


def _accumulate(acc: dict[str, jax.Array], metrics: dict[str, jax.Array], step: jax.Array) -> dict[str, jax.Array]:
    """Add one step's metrics (scalars) to the period's sums; `step` is the step just completed (1-based)."""
    w = metrics["target_tokens"]
    out = {k: acc[k] + metrics[k] * w for k in TOKEN_MEAN_KEYS}
    out.update({k: acc[k] + metrics[k] for k in STEP_MEAN_KEYS})
    out.update({f"last_{k}": metrics[k].astype(jnp.float32) for k in (*TOKEN_MEAN_KEYS, *STEP_MEAN_KEYS)})
    out["steps"] = acc["steps"] + 1
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]) & jnp.isfinite(metrics["objective"])
    first = (acc["first_nonfinite_step"] == _NO_STEP) & ~finite
    out["first_nonfinite_step"] = jnp.where(first, step.astype(jnp.int32), acc["first_nonfinite_step"])
    out["nonfinite_loss"] = jnp.where(first, metrics["loss"], acc["nonfinite_loss"])
    out["nonfinite_grad_norm"] = jnp.where(first, metrics["grad_norm"], acc["nonfinite_grad_norm"])
    return out


def summarize(acc: dict[str, Any]) -> dict[str, float]:
    """The logged record of a period from its fetched sums: token-weighted means of TOKEN_MEAN_KEYS, per-step
    means of STEP_MEAN_KEYS (with one step per period, exactly that step's metrics)."""
    n = max(int(acc["steps"]), 1)
    if n == 1:
        return {k: float(acc[f"last_{k}"]) for k in (*TOKEN_MEAN_KEYS, *STEP_MEAN_KEYS)}
    tokens = float(acc["target_tokens"])
    rec = {k: float(acc[k]) / max(tokens, 1.0) for k in TOKEN_MEAN_KEYS}
    rec.update({k: float(acc[k]) / n for k in STEP_MEAN_KEYS})
    return rec


def eval_record(per_batch: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Eval metrics from the per-batch loss sums (host values), summed in float64 in batch order."""
    tot: dict[str, float] = {}
    for sums in per_batch:
        for k, v in sums.items():
            tot[k] = tot.get(k, 0.0) + float(v)
    w = max(tot.get("weight", 0.0), 1.0)
    return {"loss": tot["cross_entropy"] / w, "z_loss": tot["z_loss"] / w, "accuracy": tot["correct"] / w,
            "target_tokens": tot["weight"]}


class Trainer:
    """Runs a `RunState` to its last step. Owns the metric writers, the eval, the saves and the stop checks.

    train_step: jitted (params, opt_state, step, batch) -> (params, opt_state, step + 1, metrics), donating its
    state (train.jit_train_step). eval_step: jitted (params, batch) -> loss sums. eval_arrays: the eval batches as
    global arrays. to_global(local_batch): this process's rows -> the global batch array dict. data_state_key: what
    the saved iterator state depends on (None: save no iterator state).
    """

    def __init__(self, cfg: "TrainConfig", state: RunState, ckpts: RunCheckpoints, *, train_step: Callable,
                 eval_step: Callable | None, eval_arrays: Sequence[dict[str, jax.Array]],
                 to_global: Callable[[dict], dict], replicated: jax.sharding.Sharding,
                 data_state_key: dict[str, Any] | None, primary: bool,
                 callback: Callable[[int, dict], None] | None = None):
        self.cfg, self.state, self.ckpts = cfg, state, ckpts
        self._train_step, self._eval_step, self._eval_arrays = train_step, eval_step, list(eval_arrays)
        self._to_global, self._data_state_key = to_global, data_state_key
        self.primary, self._callback = primary, callback
        self.step = state.step
        self.history: list[dict[str, Any]] = []
        self.eval_history: list[dict[str, Any]] = []
        self._accumulate = jax.jit(_accumulate, out_shardings=replicated, donate_argnums=(0,))
        self._new_accumulator = jax.jit(_empty_accumulator, out_shardings=replicated)
        self._acc = self._new_accumulator()
        self._step_arr = global_from_host(np.asarray(self.step, np.int32), replicated)
        self.writer = MetricWriter(ckpts.model_dir, enabled=primary, tensorboard=cfg.tensorboard)
        self._check_stop_every_step = stop_check_every_step()

    # ------------------------------------------------------------------------------------------------ host syncs

    def _to_host(self, tree: Any) -> Any:
        """Every device -> host transfer of the loop goes through here (one blocking fetch)."""
        return jax.device_get(tree)

    def _last_good(self) -> str:
        s = self.state.last_saved
        return f"{'step ' + str(s) if s is not None else 'none'} in {self.ckpts.directory}"

    def _divergence_marker(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        return (self._acc["first_nonfinite_step"], self._acc["nonfinite_loss"], self._acc["nonfinite_grad_norm"])

    def _raise_if_diverged(self, first_bad: Any, loss: Any, grad_norm: Any) -> None:
        """Stop if the period so far had a non-finite loss (host values of `_divergence_marker`)."""
        first_bad, loss, grad_norm = int(first_bad), float(loss), float(grad_norm)
        if first_bad == _NO_STEP:
            return
        self.ckpts.wait()
        seen = "" if first_bad == self.step else f" (detected at step {self.step})"
        raise NonFiniteLossError(
            f"non-finite loss={loss} / grad_norm={grad_norm} at step {first_bad}{seen}; training stopped without "
            f"saving. Last good checkpoint: {self._last_good()}. Lower the learning rate or check the data.")

    def _check_before_save(self) -> None:
        """On device, before anything is written: a checkpoint never holds NaN/Inf (nor a state reached after a
        non-finite loss), so the last saved step really is the last good one."""
        ok, marker = self._to_host((recovery.all_finite(self.state.params, self.state.opt_state),
                                    self._divergence_marker()))
        self._raise_if_diverged(*marker)
        if not bool(ok):
            self.ckpts.wait()
            raise NonFiniteLossError(
                f"non-finite parameters or optimizer state after step {self.step}; not saved. Last good checkpoint: "
                f"{self._last_good()}. Lower the learning rate or check the data.")

    # ------------------------------------------------------------------------------------------------ actions

    def save(self) -> None:
        self._check_before_save()
        s = self.state
        iterators = s.batches.iterators if self._data_state_key is not None else None
        # The iterator state is written before save() returns: `batches` has yielded exactly `step` batches.
        self.ckpts.save(self.step, s.params, s.opt_state, s.data_item(self.cfg, self.step, self._data_state_key),
                        iterators)
        s.last_saved = self.step

    def evaluate(self) -> dict[str, float]:
        per_batch, marker = self._to_host(([self._eval_step(self.state.params, b) for b in self._eval_arrays],
                                           self._divergence_marker()))
        self._raise_if_diverged(*marker)
        rec = eval_record(per_batch)
        self.writer.write(self.step, rec, split="eval")
        self.eval_history.append({"step": self.step, **rec})
        return rec

    def _log(self, period_start: float, bar: Any) -> float:
        acc = self._to_host(self._acc)
        self._raise_if_diverged(acc["first_nonfinite_step"], acc["nonfinite_loss"], acc["nonfinite_grad_norm"])
        now = time.perf_counter()
        n, dt = int(acc["steps"]), max(now - period_start, 1e-9)
        tokens_per_step = self.cfg.batch_size * (self.cfg.inputs_length + self.cfg.targets_length)
        rec = {**summarize(acc), "steps_per_second": n / dt, "tokens_per_second": n * tokens_per_step / dt}
        self.writer.write(self.step, rec)
        self.history.append({"step": self.step, **rec})
        bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_second']:.0f}")
        if self._callback is not None:
            self._callback(self.step, rec)
        self._acc = self._new_accumulator()
        return now

    def _stop_signal(self, is_log_step: bool) -> int | None:
        if self._check_stop_every_step or is_log_step:
            return preemption.stop_requested()
        return None

    def _catch_up_eval(self) -> None:
        """The run that saved the resumed step was stopped before its evaluation was written: evaluate it now.
        (Single process: every process must agree to run the collective eval, and only process 0 reads
        metrics.jsonl.)"""
        cfg, s = self.cfg, self.state
        if (s.resumed_from is not None and self._eval_arrays and self.step
                and (self.step % cfg.eval_every == 0 or self.step == s.train_steps)
                and jax.process_count() == 1 and not has_record(self.ckpts.model_dir, self.step, "eval")):
            self.evaluate()

    # ------------------------------------------------------------------------------------------------ the loop

    def run(self) -> None:
        """Train from state.step to state.train_steps; raises NonFiniteLossError or preemption.Preempted."""
        from tqdm import tqdm
        cfg, s = self.cfg, self.state
        bar = tqdm(total=s.train_steps, initial=self.step, desc="train", unit="step",
                   disable=not (self.primary and cfg.progress), dynamic_ncols=True)
        try:
            self._catch_up_eval()
            period_start = time.perf_counter()
            while self.step < s.train_steps:
                batch = self._to_global(next(s.batches))
                s.params, s.opt_state, self._step_arr, metrics = self._train_step(s.params, s.opt_state,
                                                                                  self._step_arr, batch)
                self._acc = self._accumulate(self._acc, metrics, self._step_arr)
                self.step += 1
                last = self.step == s.train_steps
                is_log_step = self.step % cfg.log_every == 0 or last
                if is_log_step:
                    period_start = self._log(period_start, bar)
                bar.update(1)
                if self.step % cfg.save_every == 0 or last or self.step in cfg.save_steps:
                    self.save()
                if self._eval_arrays and (self.step % cfg.eval_every == 0 or last):
                    rec = self.evaluate()
                    if self.ckpts.best is not None:
                        self._check_before_save()
                        self.ckpts.save_best(self.step, s.params, rec["loss"])
                # SIGTERM / SIGUSR1 (preemption, time limit): checkpoint now and stop; a re-run resumes here.
                if not last and (signum := self._stop_signal(is_log_step)) is not None:
                    if s.last_saved != self.step:
                        self.save()
                    self.ckpts.wait()
                    raise preemption.Preempted(self.step, signum)
            if s.last_saved != self.step:
                self.save()
            self.ckpts.wait()
        finally:
            bar.close()
            self.writer.close()
            self.ckpts.close()

