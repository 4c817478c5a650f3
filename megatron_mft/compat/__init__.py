"""Environment probing and the CPU compatibility shim (the only hardware-specific module)."""

from megatron_mft.compat.probe import Environment, probe


def setup_runtime() -> Environment:
    """Probe the machine; on a CPU-only machine activate the megatron-core CPU shim."""
    env = probe()
    if not env.cuda:
        from megatron_mft.compat import cpu

        cpu.activate()
    return env


__all__ = ["Environment", "probe", "setup_runtime"]
