"""Environment of a test subprocess that needs several XLA:CPU devices (set before jax is imported)."""

from __future__ import annotations

import os


def cpu_devices_env(devices: int) -> dict[str, str]:
    """``os.environ`` plus ``devices`` host-platform devices on the CPU backend. Collectives wait up to 10 minutes
    for every device to arrive: XLA:CPU's default (terminate after 40 s) failed the 8-device training fixture on a
    2-core machine, with 4 of the 8 device threads late to a collective-permute, though nothing was wrong."""
    flags = (f"--xla_force_host_platform_device_count={devices} --xla_cpu_collective_timeout_seconds=600 "
             "--xla_cpu_collective_call_terminate_timeout_seconds=600")
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
