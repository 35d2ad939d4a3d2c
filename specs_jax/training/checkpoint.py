"""Training checkpoints with Orbax: parameters, optimizer state, step, RNG and the data iterator state.

Layout of ``DIR/STEP/`` (an Orbax ``CheckpointManager`` step), one item each:

- ``params``: ``{"trained": ..., "frozen": ...}`` parameter dicts (``TrainState.params``/``frozen``);
- ``opt_state``: the optax state;
- ``progress``: ``{"step": int32, "rng": uint32[2]}``;
- ``data``: the caller's data-iterator state (any JSON-serialisable dict).

Saves are asynchronous (the next steps run while the arrays are written). Kept: the last
``keep_last_n`` checkpoints and, with ``keep_best_metric``, the best one by that metric (a
checkpoint saved without the metric is kept only while it is among the last N). Restoring places
every array with the shardings of the target :class:`TrainState`, so a resumed run continues
bit-for-bit as the uninterrupted one would.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from specs_jax.convert.io import abstract_model, save_model
from specs_jax.model import ModelConfig
from specs_jax.training.state import TrainState, join_params, model_from_params

__all__ = ["Checkpointer", "export_hf"]

ITEMS = ("params", "opt_state", "progress", "data")


def _abstract(tree: Any) -> Any:
    """``ShapeDtypeStruct`` with sharding for every array of ``tree`` (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    """Save/restore :class:`TrainState` + data state under ``directory`` (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, keep_last_n: int = 3, keep_best_metric: str | None = None,
                 best_mode: str = "min", async_save: bool = True):
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode={best_mode!r}; expected 'min' or 'max'")
        policies: list[pp.PreservationPolicy] = [pp.LatestN(n=keep_last_n)]
        if keep_best_metric is not None:
            policies.append(pp.BestN(get_metric_fn=lambda m: m[keep_best_metric], reverse=best_mode == "min", n=1,
                                     keep_checkpoints_without_metrics=False))
        self.metric = keep_best_metric
        options = ocp.CheckpointManagerOptions(preservation_policy=pp.AnyPreservationPolicy(policies),
                                               enable_async_checkpointing=async_save, create=True)
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def save(self, state: TrainState, data_state: dict[str, Any], metrics: dict[str, float] | None = None) -> int:
        """Start saving ``state`` at its step (asynchronously); ``metrics`` rank it for ``keep_best_metric``
        (a metric missing there is not an error: the checkpoint just does not compete for best)."""
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


def export_hf(checkpoint_dir: str | os.PathLike, model_cfg: ModelConfig, out_dir: str | os.PathLike,
              step: int | None = None, overwrite: bool = False) -> Path:
    """Write the parameters of a training checkpoint (default: latest step) as an HF model directory
    (:func:`specs_jax.convert.io.save_model` with ``fmt="hf"``); only the ``params`` item is read. In a
    multi-process job every process calls it (Orbax restores collectively) and process 0 writes."""
    manager = ocp.CheckpointManager(Path(checkpoint_dir).absolute(), item_names=ITEMS,
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}")
    restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
    manager.close()
    if jax.process_index() != 0:  # every process of a job takes part in the restore; process 0 writes
        return Path(out_dir)
    params = nnx.restore_int_paths(join_params(restored.params["trained"], restored.params["frozen"]))
    model = model_from_params(nnx.graphdef(abstract_model(model_cfg)), params)
    return save_model(model, out_dir, fmt="hf", overwrite=overwrite)
