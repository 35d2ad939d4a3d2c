"""One interface and one registry for every training kind (``sft``, ``dpo``, ``grpo``, ``opsd``, ``vigos``,
and any kind a user adds).

An :class:`Algorithm` says everything the trainer needs to know about a kind:

- ``data``: the batches it trains on: ``"sft"`` rows, ``"preference"`` pairs, or ``"rl"`` prompts that it
  rolls out (then :class:`~specs_jax.training.rl.RLTrainer` runs it: rollout -> rewards -> updates);
- its loss: ``loss.name`` names any registered loss (:func:`specs_jax.losses.register_loss`) whose
  positional inputs are the kind's :attr:`Algorithm.loss_inputs` (default: :attr:`Algorithm.default_loss`);
  ``loss.kwargs`` are checked against the loss's keyword-only options, and every default is the
  loss signature's (:func:`loss_options` reads them: they are written once, in the loss);
- :meth:`Algorithm.spec`: the :class:`~specs_jax.training.steps.LossSpec` of its step;
  :meth:`Algorithm.prepare` / :meth:`Algorithm.shardings`: host batch -> stacked, sharded step batch;
- its frozen models: :attr:`Algorithm.reference` (the step gets the starting parameters as ``extra``,
  e.g. a DPO/GRPO reference or the distillation teachers) and :attr:`Algorithm.extra_forwards`
  (forward passes of them per update), from which :meth:`Algorithm.flops_factor` counts model FLOPs;
- :attr:`Algorithm.summary_metric`: the metric the CLI reports first and last.

Register a new kind with :func:`register_algorithm`; ``specs-jax train KIND`` and
:func:`~specs_jax.training.rl.make_trainer` find it by name (``docs/extending.md`` walks through it).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from specs_jax.losses import get_loss, list_losses
from specs_jax.model import ModelConfig
from specs_jax.training.config import RunConfig
from specs_jax.training.steps import LossSpec, batch_shardings

__all__ = ["DATA_KINDS", "Algorithm", "get_algorithm", "list_algorithms", "loss_options", "register_algorithm",
           "resolve_loss"]

DATA_KINDS = ("sft", "preference", "rl")
BUILTIN_MODULES = ("specs_jax.training.supervised", "specs_jax.training.grpo", "specs_jax.training.distill")

_ALGORITHMS: dict[str, type[Algorithm]] = {}
A = TypeVar("A", bound="type[Algorithm]")


def positional_inputs(fn: Callable) -> tuple[str, ...]:
    """Names of ``fn``'s positional parameters (a loss's data inputs)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(k for k, p in inspect.signature(fn).parameters.items() if p.kind in kinds)


def loss_options(fn: Callable, kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every keyword-only option of ``fn`` with its effective value: the signature's default, overridden
    by ``kwargs``."""
    params = inspect.signature(fn).parameters
    out = {k: p.default for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return {**out, **(kwargs or {})}


def resolve_loss(kind: str, name: str, inputs: tuple[str, ...], kwargs: Mapping[str, Any],
                 internal: tuple[str, ...] = ()) -> Callable:
    """The registered loss ``name`` for training kind ``kind``, after checking that it takes the kind's
    positional ``inputs`` and that every key of ``kwargs`` is one of its keyword-only options (``internal``:
    keyword inputs the step passes itself, refused in ``kwargs``); ``ValueError`` naming what is wrong."""
    fn = get_loss(name)
    if positional_inputs(fn) != inputs:
        fits = [n for n in list_losses() if positional_inputs(get_loss(n)) == inputs]
        raise ValueError(f"loss {name!r} takes {positional_inputs(fn)}, but `train {kind}` passes {inputs}; "
                         f"losses that fit (config loss.name): {fits}")
    options = [k for k in loss_options(fn) if k not in internal]
    unknown = [k for k in kwargs if k not in options]
    if unknown:
        raise ValueError(f"loss {name!r} has no option(s) {unknown} (config loss.kwargs); options: {options}")
    return fn


class Algorithm:
    """What one training kind adds to the shared training loop (module docstring).

    Constructed by the trainer once the policy exists: ``graphdef`` / ``model_cfg`` of the policy, and
    ``processor`` (:class:`~specs_jax.data.tokenizer.Processor`, rollout kinds: decodes completions and
    builds contexts). Subclasses set the class attributes and implement :meth:`spec` and :meth:`prepare`;
    rollout kinds (``data = "rl"``) also :meth:`sequences`.
    """

    kind: ClassVar[str] = ""  # set by register_algorithm
    data: ClassVar[str]  # "sft" | "preference" | "rl"
    default_loss: ClassVar[str]
    loss_inputs: ClassVar[tuple[str, ...]]  # positional inputs of its losses
    internal: ClassVar[tuple[str, ...]] = ()  # keyword inputs of the loss that the step sets itself
    algo_options: ClassVar[dict[str, Any]] = {}  # options of the algorithm itself in loss.kwargs, with defaults
    batch_unit: ClassVar[str] = "rows"  # what train.batch_size counts
    summary_metric: ClassVar[str] = "loss"
    takes_precomputed_reference: ClassVar[bool] = False  # batches may carry ``ref_logps`` instead of ``extra``
    system_prompt: str | None = None  # rollout kinds: the prompts' system message (None: data.system_prompt)

    def __init__(self, cfg: RunConfig, graphdef: nnx.GraphDef, model_cfg: ModelConfig, processor: Any = None):
        self.cfg, self.graphdef, self.model_cfg, self.processor = cfg, graphdef, model_cfg, processor
        self.loss_name = cfg.loss.name or self.default_loss
        kwargs = dict(cfg.loss.kwargs)
        self.options = {k: kwargs.pop(k, v) for k, v in self.algo_options.items()}
        self.loss_fn = resolve_loss(self.kind, self.loss_name, self.loss_inputs, kwargs, self.internal)
        self.loss_kwargs = kwargs

    @property
    def rolls_out(self) -> bool:
        return self.data == "rl"

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per loop step (rollout kinds: ``rl.num_iterations`` per rollout batch)."""
        return self.cfg.rl.num_iterations if self.rolls_out else 1

    @property
    def reference(self) -> bool:
        """Whether the step gets a frozen copy of the starting parameters as ``extra``."""
        return False

    @property
    def extra_forwards(self) -> int:
        """Forward passes of the frozen model per update (reference or teachers), for the FLOP count."""
        return int(self.reference)

    def flops_factor(self) -> int:
        """Model FLOPs per token per matmul parameter of one loop step: each update's forward + backward
        (6) and frozen forwards (2 each), plus the sampler's forward (2) for rollout kinds."""
        return 2 * self.rolls_out + self.updates_per_step * (6 + 2 * self.extra_forwards)

    def option(self, name: str) -> Any:
        """The effective value of the loss option ``name`` (``loss.kwargs``, else the loss's default)."""
        return loss_options(self.loss_fn, self.loss_kwargs)[name]

    def spec(self) -> LossSpec:
        raise NotImplementedError

    def prepare(self, batch: Mapping[str, Any], accum: int) -> Any:
        """Host batch dict -> the step batch, every leaf stacked ``[accum, ...]``."""
        raise NotImplementedError

    def shardings(self, prepared: Any, mesh: Mesh) -> Any:
        """Shardings of a prepared step batch (default: rows over the ``(data, fsdp)`` axes)."""
        return batch_shardings(prepared, mesh)

    def rows(self, batch: Mapping[str, Any]) -> int:
        """Units of ``train.batch_size`` (:attr:`batch_unit`) in this process's host batch."""
        return len(batch["input_ids"])

    def row_order(self, batch: Mapping[str, Any]) -> np.ndarray:
        """The host rows of ``batch`` in the order of its one-micro-batch step batch (default: unchanged)."""
        return np.arange(len(batch["input_ids"]))

    def check_batch(self, batch: Mapping[str, Any]) -> None:
        """Refuse a host batch this kind cannot train on (default: accept)."""

    def sequences(self, prompts: Mapping[str, Any], ro: Any) -> dict:
        """Rollout kinds: the host step batch dict of a scored rollout (with a ``loss_mask``)."""
        raise NotImplementedError(f"{self.kind} does not roll out")

    def refresh(self, model: nnx.Module, micro: Any) -> Any:
        """Rollout kinds: a micro-batch of the step batch recomputed with the current policy ``model`` once
        before the updates (e.g. the trainer's own old log-probs), or None (default) to keep it."""
        return None


def register_algorithm(kind: str) -> Callable[[A], A]:
    """Class decorator registering an :class:`Algorithm` subclass as training kind ``kind``."""

    def decorator(cls: A) -> A:
        if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
            raise TypeError(f"register_algorithm({kind!r}) decorates Algorithm subclasses, got {cls!r}")
        if cls.data not in DATA_KINDS:
            raise ValueError(f"algorithm {kind!r}: data must be one of {DATA_KINDS}, got {cls.data!r}")
        if kind in _ALGORITHMS and _ALGORITHMS[kind].__qualname__ != cls.__qualname__:
            raise ValueError(f"training kind {kind!r} is already registered (by {_ALGORITHMS[kind].__module__}."
                             f"{_ALGORITHMS[kind].__qualname__})")
        cls.kind = kind
        _ALGORITHMS[kind] = cls
        return cls

    return decorator


def _load_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def get_algorithm(kind: str) -> type[Algorithm]:
    """The algorithm class of training kind ``kind``; ``ValueError`` listing the known kinds otherwise."""
    _load_builtins()
    if kind not in _ALGORITHMS:
        raise ValueError(f"unknown training kind {kind!r}; known kinds: {list_algorithms()}")
    return _ALGORITHMS[kind]


def list_algorithms() -> list[str]:
    """Names of the registered training kinds (built-ins first)."""
    _load_builtins()
    return list(_ALGORITHMS)
