"""Environment of a test subprocess that needs several XLA:CPU devices (set before jax is imported)."""

from __future__ import annotations

import os


def cpu_devices_env(devices: int) -> dict[str, str]:
    """``os.environ`` plus ``devices`` host-platform devices on the CPU backend. Collectives wait up to 10 minutes
    for every device to arrive: XLA:CPU's default rendezvous timeout (40 s) fails a collective when a 2-core
    machine runs 8 device threads beside other work, though nothing is wrong."""
    flags = f"--xla_force_host_platform_device_count={devices} --xla_cpu_collective_timeout_seconds=600"
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
