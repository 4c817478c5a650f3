"""Launch: torchrun / SLURM environment -> ranks and rendezvous; preemption signals.

Names are loaded lazily, so ``python -m megatron_mft.launch.hostnames`` and
``python -m megatron_mft.launch.env`` run their modules cleanly, and nothing here imports
torch at import time (``run_scripts/common.sh`` calls the host-list expander before a launch).
"""

import importlib

_EXPORTS = {
    "DistEnv": "env", "LaunchError": "env", "default_port": "env", "init_distributed": "env",
    "parse_tasks_per_node": "env", "read_dist_env": "env",
    "HostListError": "hostnames", "expand_nodelist": "hostnames",
    "PreemptionGuard": "signals",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
