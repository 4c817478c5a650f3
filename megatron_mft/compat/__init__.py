"""Environment probing, the CPU compatibility shim, and fixes for megatron-core paths without Apex/TE."""

from megatron_mft.compat.probe import Environment, available_memory, probe


def setup_runtime() -> Environment:
    """Probe the machine; on a CPU-only machine activate the megatron-core CPU shim."""
    env = probe()
    if not env.cuda:
        from megatron_mft.compat import cpu

        cpu.activate()
    if not (env.apex or env.te):
        from megatron_mft.compat import megatron_fixes

        megatron_fixes.apply()
    return env


__all__ = ["Environment", "available_memory", "probe", "setup_runtime"]
