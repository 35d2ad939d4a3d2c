"""Environment of a test subprocess that needs several XLA:CPU devices (set before jax is imported)."""

from __future__ import annotations

import os


def cpu_devices_env(devices: int) -> dict[str, str]:
    """``os.environ`` plus ``devices`` host-platform devices on the CPU backend.

    XLA:CPU runs a collective that may block (all-gather, all-reduce, ...) on a thread of its intra-op pool, whose
    size is ``max(PJRT_NPROC or cores, devices)``: 8 threads for 8 devices on a 2-core machine. When one program
    has two independent collectives ready, each device may start either first, and a thread stays blocked in the
    rendezvous until the other devices join that same collective; with 8 threads all held by participants waiting
    for partners whose turn is queued behind them, the program never finishes (CI: devices 0 and 2 parked on
    all-gathers 34 and 200, one each, 6 of the 8 threads blocked, after 600 s). ``PJRT_NPROC`` = 4 threads per
    device leaves room for four such collectives in flight per device (the 8-device training fixture runs as
    fast: 83 s vs 96 s). Collectives wait up to 10 minutes before XLA aborts the process (default 40 s)."""
    flags = (f"--xla_force_host_platform_device_count={devices} --xla_cpu_collective_timeout_seconds=600 "
             "--xla_cpu_collective_call_terminate_timeout_seconds=600")
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "PJRT_NPROC": str(4 * devices)}
