"""Training checkpoints with Orbax: parameters, optimizer state, step, RNG and the data iterator state.

Layout of ``DIR/STEP/`` (an Orbax ``CheckpointManager`` step), one item each:

- ``params``: ``{"trained": ..., "frozen": ...}`` parameter dicts (``TrainState.params``/``frozen``);
- ``opt_state``: the optax state;
- ``progress``: ``{"step": int32, "rng": uint32[2]}``;
- ``data``: the caller's data-iterator state (any JSON-serialisable dict);
- ``metrics``: with ``keep_best_metric``, the step's metrics (what ranks it).

Beside the steps, the first save records ``DIR/specs_jax_run.json`` (the best-metric settings) and
``DIR/model/`` (the HF config of the model trained and the tokenizer, processor, chat-template and
generation-config files of the model it started from), so that any step converts to HF, loads and
evaluates on its own: ``specs-jax convert orbax-to-hf RUN/checkpoints/STEP OUT`` (or ``RUN OUT --step
latest|best|N``), ``load_model("RUN/checkpoints/STEP")``; see :mod:`specs_jax.convert.training`.

Saves are asynchronous (the next steps run while the arrays are written). Kept: the last
``keep_last_n`` checkpoints and, with ``keep_best_metric``, the best one by that metric (a
checkpoint saved without the metric is kept only while it is among the last N; the metrics are
stored with each step, so the best survives a resume). Restoring places every array with the
shardings of the target :class:`TrainState`, so a resumed run continues bit-for-bit as the
uninterrupted one would.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from specs_jax.convert.training import write_run_record
from specs_jax.model import ModelConfig
from specs_jax.training.state import TrainState

__all__ = ["Checkpointer", "export_hf"]

ITEMS = ("params", "opt_state", "progress", "data")


def _abstract(tree: Any) -> Any:
    """``ShapeDtypeStruct`` with sharding for every array of ``tree`` (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _directory(directory: str | os.PathLike) -> Path:
    """A local path made absolute; ``gs://...`` and other URLs kept intact (``etils.epath``)."""
    if "://" in os.fspath(directory):
        from etils import epath

        return epath.Path(os.fspath(directory))
    return Path(directory).absolute()


class Checkpointer:
    """Save/restore :class:`TrainState` + data state under ``directory`` (see the module docstring).

    ``model``: the config of the model trained and ``model_files``: the directory (or training
    checkpoint) of the model it started from, recorded beside the steps on the first save.
    """

    def __init__(self, directory: str | os.PathLike, keep_last_n: int = 3, keep_best_metric: str | None = None,
                 best_mode: str = "min", async_save: bool = True, *, model: ModelConfig | None = None,
                 model_files: str | os.PathLike | None = None):
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode={best_mode!r}; expected 'min' or 'max'")
        policies: list[pp.PreservationPolicy] = [pp.LatestN(n=keep_last_n)]
        best_fn = None if keep_best_metric is None else (lambda m: m[keep_best_metric])
        if best_fn is not None:
            policies.append(pp.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
                                     keep_checkpoints_without_metrics=False))
        self.metric, self.best_mode = keep_best_metric, best_mode
        self.model, self.model_files = model, model_files
        self._recorded = False
        # best_fn also makes Orbax write each step's metrics (the preservation policy alone does not)
        options = ocp.CheckpointManagerOptions(preservation_policy=pp.AnyPreservationPolicy(policies),
                                               best_fn=best_fn, best_mode=best_mode,
                                               enable_async_checkpointing=async_save, create=True)
        self.directory = _directory(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def _record(self) -> None:
        if not self._recorded and jax.process_index() == 0:
            write_run_record(self.directory, self.model, self.model_files, self.metric, self.best_mode)
        self._recorded = True

    def save(self, state: TrainState, data_state: dict[str, Any], metrics: dict[str, float] | None = None) -> int:
        """Start saving ``state`` at its step (asynchronously); ``metrics`` rank it for ``keep_best_metric``
        (a metric missing there is not an error: the checkpoint just does not compete for best)."""
        self._record()
        step = int(state.step)
        if self.metric is not None and metrics is not None and self.metric not in metrics:
            metrics = None
        args = ocp.args.Composite(
            params=ocp.args.StandardSave({"trained": state.params, "frozen": state.frozen}),
            opt_state=ocp.args.StandardSave(state.opt_state),
            progress=ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
            data=ocp.args.JsonSave(data_state))
        self.manager.save(step, args=args, metrics=metrics if self.metric is not None else None)
        return step

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """``(state, data_state)`` of ``step`` (default: the latest), placed like ``target``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract({"trained": target.params, "frozen": target.frozen})),
            opt_state=ocp.args.StandardRestore(_abstract(target.opt_state)),
            progress=ocp.args.StandardRestore(_abstract({"step": target.step, "rng": target.rng})),
            data=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        state = TrainState(out.progress["step"], out.params["trained"], out.params["frozen"], out.opt_state,
                           out.progress["rng"])
        return state, dict(out.data)

    def wait(self) -> None:
        """Block until pending asynchronous saves are written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def export_hf(checkpoint_dir: str | os.PathLike, model_cfg: ModelConfig | None, out_dir: str | os.PathLike,
              step: int | str | None = None, overwrite: bool = False, dtype: str | None = None) -> Path:
    """Write one step of a training checkpoint directory (default: the latest) as an HF model
    directory, with the tokenizer files the run recorded; ``model_cfg`` (default: the run's record)
    describes the model. Only the ``params`` item is read, one state entry at a time
    (:func:`specs_jax.convert.training.training_to_hf`)."""
    from specs_jax.convert.training import training_to_hf

    return training_to_hf(checkpoint_dir, out_dir, step="latest" if step is None else step, dtype=dtype,
                          model=model_cfg, overwrite=overwrite)
