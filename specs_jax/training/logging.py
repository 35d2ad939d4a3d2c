"""Per-step metrics: JSONL, TensorBoard (tensorboardX), optional W&B, a tqdm bar; throughput, MFU, NaN guard.

MFU = achieved model FLOP/s / peak FLOP/s of the devices, with the model FLOPs of a training
step estimated as ``6 * N * tokens`` (N: parameters of the decoder and LM head; forward + backward
of the matmuls, attention's quadratic term ignored) plus ``2 * N * tokens`` per extra forward
(e.g. a DPO reference model). Peak dense bf16 FLOP/s per device come from :data:`PEAK_FLOPS`
(no entry, e.g. CPU: no MFU is reported).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import jax

__all__ = ["PEAK_FLOPS", "MetricLogger", "NonFiniteLossError", "check_finite", "peak_flops_per_device",
           "write_json_atomic"]


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to a temporary file beside ``path``, then rename it into place: a kill
    never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

# Dense bf16 peak FLOP/s per device (per chip for TPUs), from the vendors' data sheets.
PEAK_FLOPS: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,  # SXM
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops_per_device(device: Any = None) -> float | None:
    """Peak bf16 FLOP/s of ``device`` (default: the first device), matched by the longest known
    prefix of its ``device_kind``; None when unknown (CPU)."""
    kind = (device or jax.devices()[0]).device_kind
    matches = [k for k in PEAK_FLOPS if kind.startswith(k) or kind.replace("-", " ").startswith(k)]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


class NonFiniteLossError(FloatingPointError):
    """A step produced a NaN/Inf loss or gradient norm; its state was not saved."""


def check_finite(step: int, metrics: dict[str, float]) -> None:
    """Raise :class:`NonFiniteLossError` naming ``step`` if the loss or the gradient norm is NaN/Inf."""
    bad = {k: metrics[k] for k in ("loss", "grad_norm") if k in metrics and not math.isfinite(metrics[k])}
    if bad:
        raise NonFiniteLossError(f"non-finite {bad} at step {step}; stopping (the last saved checkpoint is "
                                 "the last good state)")


class MetricLogger:
    """Writes ``{"step": k, **metrics}`` lines to ``OUT/metrics.jsonl``, scalars to TensorBoard
    (``OUT/tensorboard``) and W&B, and drives a tqdm bar (ETA from tqdm's rate). Only process 0 writes.

    ``log(step, metrics, tokens, seconds)`` adds ``perf/tokens_per_s`` and, when the device's peak is
    known, ``perf/mfu`` from ``flops_per_token`` (see the module docstring).
    """

    def __init__(self, out_dir: str | os.PathLike, total_steps: int, start_step: int = 0, *, jsonl: bool = True,
                 tensorboard: bool = True, wandb: bool = False, wandb_project: str = "specs-jax",
                 progress: bool = True, flops_per_token: float | None = None, config: dict | None = None):
        self.main = jax.process_index() == 0
        self.out = Path(out_dir)
        self.flops_per_token = flops_per_token
        peak = peak_flops_per_device()
        self.peak_total = None if peak is None else peak * jax.device_count()
        self.jsonl = self.tb = self.wandb = self.bar = None
        if not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if jsonl:
            self.jsonl = open(self.out / "metrics.jsonl", "a")  # noqa: SIM115 (closed by close())
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                raise ValueError("log.wandb is true but the wandb package is not installed") from None
            self.wandb = wandb_lib.init(project=wandb_project, config=config, dir=str(self.out), resume="allow")
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float], tokens: float | None = None,
            seconds: float | None = None) -> dict[str, float]:
        """Record the metrics of ``step`` (plus throughput when ``tokens`` and ``seconds`` are given)."""
        metrics = dict(metrics)
        if tokens is not None and seconds:
            metrics["perf/tokens_per_s"] = tokens / seconds
            if self.flops_per_token is not None and self.peak_total is not None:
                metrics["perf/mfu"] = self.flops_per_token * tokens / seconds / self.peak_total
        if not self.main:
            return metrics
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "grad_norm") if k in metrics})
        return metrics

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.bar is not None:
            self.bar.close()
