"""Launcher environment (torchrun, SLURM, or nothing) -> ranks and the rendezvous address.

Which launcher:

* **torchrun** when ``RANK`` and ``WORLD_SIZE`` are set. It wins over SLURM, so torchrun
  started once per node by ``srun`` works (SLURM's variables then describe the torchrun
  processes, not the trainers).
* **slurm** when ``SLURM_PROCID`` and ``SLURM_NTASKS`` are set (``srun``, one task per GPU).
  Step variables (``SLURM_STEP_*``, set by ``srun``) are preferred to job-level ones.
* **single** otherwise: one process, rank 0.

``MFT_LAUNCHER=torchrun|slurm|single`` forces the choice, e.g. ``MFT_LAUNCHER=single`` for a
one-process debug run typed inside an ``sbatch``/``salloc`` allocation that requested several
tasks (without it, such a process would wait for ranks that never start).

Rendezvous under SLURM: ``MASTER_ADDR`` if set (an explicit override, e.g. to pick a
particular network interface's address), else the first host of the node list, expanded by
:mod:`megatron_mft.launch.hostnames`. ``MASTER_PORT`` if set, else derived from
``SLURM_JOB_ID`` (:func:`default_port`) so concurrent jobs sharing a node do not collide.

Inconsistent variables raise :class:`LaunchError` listing every problem, with the variables
and their values.

``python -m megatron_mft.launch.env`` prints the resolved environment as JSON (a quick check:
``srun python -m megatron_mft.launch.env``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Literal, Mapping

from megatron_mft.errors import UsageError
from megatron_mft.launch.hostnames import NODELIST_VARS, HostListError, expand_nodelist

__all__ = ["DistEnv", "LaunchError", "default_port", "init_distributed", "parse_tasks_per_node", "read_dist_env"]

Source = Literal["torchrun", "slurm", "single"]
#: where a single process serves its own rendezvous store, and a launcher the store its ranks join
LOOPBACK = "127.0.0.1"

#: Port range used for ports derived from the SLURM job id.
PORT_BASE, PORT_SPAN = 10000, 20000
DEFAULT_PORT = 29500


class LaunchError(UsageError, RuntimeError):
    """The launcher's variables do not describe a consistent set of processes (exit 2)."""

    def __init__(self, source: str, problems: list[str], variables: Mapping[str, str]):
        self.problems = problems
        shown = ", ".join(f"{k}={v!r}" for k, v in variables.items()) or "(none set)"
        lines = [f"inconsistent {source} launch environment:"]
        lines += [f"  - {p}" for p in problems]
        lines.append(f"  variables: {shown}")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    #: 0 = not chosen: :func:`init_distributed` fills in the port it serves (single processes, which
    #: always serve their own store on the loopback).
    master_port: int
    source: Source
    num_nodes: int = 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "DistEnv":
        """Read the launcher's variables from ``environ`` (default: ``os.environ``)."""
        env = os.environ if environ is None else environ
        forced = env.get("MFT_LAUNCHER", "").strip().lower()
        if forced and forced not in ("torchrun", "slurm", "single"):
            raise LaunchError("MFT_LAUNCHER", [f"MFT_LAUNCHER={forced!r} is not torchrun, slurm or single"], {})
        if forced == "torchrun" or (not forced and "RANK" in env and "WORLD_SIZE" in env):
            return _from_torchrun(env)
        if forced == "slurm" or (not forced and "SLURM_PROCID" in env and _first(env, _NTASKS_VARS)):
            return _from_slurm(env)
        return _single(env)

    @classmethod
    def single(cls) -> "DistEnv":
        """One process: :func:`init_distributed` serves its store on the loopback, on a port it is given."""
        return cls(0, 1, 0, 1, 0, LOOPBACK, 0, "single", 1)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Same as :meth:`DistEnv.from_env`."""
    return DistEnv.from_env(environ)


def default_port(job_id: str | int | None) -> int:
    """Rendezvous port for a SLURM job: ``10000 + job_id % 20000`` (29500 without a job id).

    ``run_scripts/common.sh`` uses the same formula; keep them equal.
    """
    digits = re.sub(r"\D", "", str(job_id or ""))
    return PORT_BASE + int(digits) % PORT_SPAN if digits else DEFAULT_PORT


def parse_tasks_per_node(text: str) -> list[int]:
    """SLURM's ``SLURM_TASKS_PER_NODE`` form: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    out: list[int] = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ValueError(f"cannot parse tasks per node {text!r} (expected e.g. '8', '8(x4)', '2(x3),1')")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


# ----------------------------------------------------------------------------------- readers

_NTASKS_VARS = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
_NNODES_VARS = ("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
_TPN_LIST_VARS = ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    for n in names:
        if env.get(n, "").strip():
            return n, env[n].strip()
    return None


def _int(env: Mapping[str, str], name: str, problems: list[str], default: int | None = None) -> int | None:
    raw = env.get(name)
    if raw is None or not raw.strip():
        if default is None:
            problems.append(f"{name} is not set")
        return default
    try:
        value = int(raw)
    except ValueError:
        problems.append(f"{name}={raw!r} is not an integer")
        return default
    if value < 0:
        problems.append(f"{name}={value} is negative")
    return value


def _port(env: Mapping[str, str], default: int, problems: list[str]) -> int:
    port = _int(env, "MASTER_PORT", problems, default)
    if port is not None and not 0 < port < 65536 and "MASTER_PORT" in env:
        problems.append(f"MASTER_PORT={port} is not a TCP port (1-65535)")
    return port if port is not None else default


def _shown(env: Mapping[str, str], prefixes: tuple[str, ...], names: tuple[str, ...]) -> dict[str, str]:
    return {k: env[k] for k in sorted(env) if k in names or k.startswith(prefixes)}


_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                  "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _from_torchrun(env: Mapping[str, str]) -> DistEnv:
    p: list[str] = []
    rank = _int(env, "RANK", p)
    world = _int(env, "WORLD_SIZE", p)
    local_rank = _int(env, "LOCAL_RANK", p, 0 if world == 1 else None)
    local_world = _int(env, "LOCAL_WORLD_SIZE", p, world if world is not None else 1)
    if world is not None and world < 1:
        p.append(f"WORLD_SIZE={world} must be >= 1")
    if None not in (rank, world) and rank >= world:
        p.append(f"RANK={rank} must be < WORLD_SIZE={world}")
    if None not in (local_rank, local_world) and local_rank >= local_world:
        p.append(f"LOCAL_RANK={local_rank} must be < LOCAL_WORLD_SIZE={local_world}")
    num_nodes = node_rank = None
    if world and local_world and not p:
        groups = _int(env, "GROUP_WORLD_SIZE", p, 0)
        if groups:
            if world != groups * local_world:
                p.append(f"WORLD_SIZE={world} != GROUP_WORLD_SIZE={groups} x LOCAL_WORLD_SIZE={local_world}")
            num_nodes = groups
        elif world % local_world:
            p.append(f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local_world}")
        else:
            num_nodes = world // local_world
        node_rank = _int(env, "GROUP_RANK", p, rank // local_world)
        if num_nodes and node_rank is not None and node_rank >= num_nodes:
            p.append(f"GROUP_RANK={node_rank} must be < number of nodes {num_nodes}")
    addr = env.get("MASTER_ADDR", "").strip()
    if not addr:
        if world and world > 1:
            p.append("MASTER_ADDR is not set (torchrun sets it; set it when launching by hand)")
        addr = "127.0.0.1"
    port = _port(env, DEFAULT_PORT, p)
    if p:
        raise LaunchError("torchrun", p, _shown(env, ("TORCHELASTIC_",), _TORCHRUN_VARS))
    return DistEnv(rank, world, local_rank, local_world, node_rank, addr, port, "torchrun", num_nodes)


def _from_slurm(env: Mapping[str, str]) -> DistEnv:
    p: list[str] = []
    rank = _int(env, "SLURM_PROCID", p)
    ntasks_var = (_first(env, _NTASKS_VARS) or ("SLURM_NTASKS", ""))[0]
    world = _int(env, ntasks_var, p)
    local_rank = _int(env, "SLURM_LOCALID", p, 0 if world == 1 else None)

    hosts: list[str] | None = None
    nodelist = _first(env, NODELIST_VARS)
    if nodelist:
        try:
            hosts = expand_nodelist(nodelist[1])
        except HostListError as e:
            p.append(f"{nodelist[0]}: {e}")

    nnodes_var = _first(env, _NNODES_VARS)
    num_nodes = _int(env, nnodes_var[0], p) if nnodes_var else None
    if num_nodes is not None and hosts is not None and len(hosts) != num_nodes:
        p.append(f"{nodelist[0]}={nodelist[1]!r} has {len(hosts)} hosts but {nnodes_var[0]}={num_nodes}")
    if num_nodes is None:
        num_nodes = len(hosts) if hosts else None

    tasks_per_node: list[int] | None = None
    tpn = _first(env, _TPN_LIST_VARS)
    if tpn:
        try:
            tasks_per_node = parse_tasks_per_node(tpn[1])
        except ValueError as e:
            p.append(f"{tpn[0]}: {e}")
        if tasks_per_node and num_nodes is not None and len(tasks_per_node) != num_nodes:
            if len(tasks_per_node) == 1:
                tasks_per_node *= num_nodes
            else:
                p.append(f"{tpn[0]}={tpn[1]!r} lists {len(tasks_per_node)} nodes but the job has {num_nodes}")
    elif env.get("SLURM_NTASKS_PER_NODE", "").strip():
        tpn = ("SLURM_NTASKS_PER_NODE", env["SLURM_NTASKS_PER_NODE"])
        n = _int(env, "SLURM_NTASKS_PER_NODE", p)
        if n is not None:
            tasks_per_node = [n] * (num_nodes or (world // n if world and n else 1))
    if tasks_per_node is None and world is not None:
        if num_nodes in (None, 1):
            tasks_per_node = [world]
        else:
            p.append(f"cannot tell tasks per node: set SLURM_TASKS_PER_NODE or SLURM_NTASKS_PER_NODE "
                     f"({num_nodes} nodes, {world} tasks)")
    if tasks_per_node is not None and num_nodes is None:
        num_nodes = len(tasks_per_node)

    if world is not None and world < 1:
        p.append(f"{ntasks_var}={world} must be >= 1")
    if None not in (rank, world) and rank >= world:
        p.append(f"SLURM_PROCID={rank} must be < {ntasks_var}={world}")
    if tasks_per_node and world is not None and sum(tasks_per_node) != world:
        p.append(f"{ntasks_var}={world} != nodes x tasks per node = {' + '.join(map(str, tasks_per_node))}"
                 f" = {sum(tasks_per_node)} (from {tpn[0] if tpn else 'defaults'})")

    node_rank = None
    if "SLURM_NODEID" in env:
        node_rank = _int(env, "SLURM_NODEID", p)
    elif tasks_per_node and rank is not None:  # block distribution: fill node 0 first
        bounds = [sum(tasks_per_node[: i + 1]) for i in range(len(tasks_per_node))]
        node_rank = next((i for i, b in enumerate(bounds) if rank < b), len(bounds) - 1)
    if num_nodes is not None and node_rank is not None and node_rank >= num_nodes:
        p.append(f"SLURM_NODEID={node_rank} must be < number of nodes {num_nodes}")
        node_rank = None
    local_world = tasks_per_node[node_rank] if tasks_per_node and node_rank is not None else None
    if None not in (local_rank, local_world) and local_rank >= local_world:
        p.append(f"SLURM_LOCALID={local_rank} must be < tasks on this node = {local_world} "
                 f"(node {node_rank} in {tpn[0] if tpn else 'defaults'})")

    addr = env.get("MASTER_ADDR", "").strip() or (hosts[0] if hosts else "")
    if not addr:
        if world is not None and world > 1:
            p.append(f"no master address: set MASTER_ADDR or one of {', '.join(NODELIST_VARS)}")
        addr = "127.0.0.1"
    port = _port(env, default_port(env.get("SLURM_JOB_ID")), p)
    if p:
        raise LaunchError("SLURM", p, _shown(env, ("SLURM_STEP_",), (
            "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_NPROCS",
            "SLURM_NNODES", "SLURM_JOB_NUM_NODES", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE",
            *NODELIST_VARS, "MASTER_ADDR", "MASTER_PORT")))
    return DistEnv(rank, world, local_rank, local_world, node_rank, addr, port, "slurm", num_nodes)


def _single(env: Mapping[str, str]) -> DistEnv:
    """One process: MASTER_ADDR / MASTER_PORT are not read (a leftover value, even a malformed one,
    must not stop it)."""
    return DistEnv.single()


# ------------------------------------------------------------------------------------ init

#: torch's switch (torchrun sets it for its workers) that makes every rank a client of a store
#: its launcher holds, rank 0 included
AGENT_STORE_ENV = "TORCHELASTIC_USE_AGENT_STORE"


def launcher_store(world_size: int, addr: str = LOOPBACK):
    """A rendezvous store served by a launcher that starts its ranks itself (``convert verify``,
    tests, benches), on a port the kernel assigns while binding (port 0), as torchrun's agent
    does; each rank joins with :func:`join_launcher_store`. Keep the returned store alive until
    they finish. A port chosen, released and bound again later could be taken in between by any
    other process."""
    from torch.distributed import TCPStore

    return TCPStore(addr, 0, world_size, is_master=True, wait_for_workers=False)


def join_launcher_store(rank: int, world_size: int, port: int, backend: str | None = None,
                        addr: str = LOOPBACK, timeout_minutes: float = 30.0) -> "DistEnv":
    """One of ``world_size`` local ranks joins its launcher's :func:`launcher_store` (every rank a
    client, as torchrun's workers) through :func:`init_distributed`."""
    os.environ[AGENT_STORE_ENV] = "True"
    return init_distributed(DistEnv(rank, world_size, rank, world_size, 0, addr, port, "torchrun", 1), backend,
                            timeout_minutes)


def init_distributed(env: DistEnv | None = None, backend: str | None = None,
                     timeout_minutes: float = 30.0) -> DistEnv:
    """Start ``torch.distributed`` for ``env`` (default: :meth:`DistEnv.from_env`).

    Backend ``nccl`` when CUDA is available, else ``gloo``. On CUDA the current device is set
    from the local rank first (a task that sees a single GPU, as with ``--gpus-per-task=1``,
    uses device 0). Rendezvous is ``tcp://MASTER_ADDR:MASTER_PORT``; the standard variables
    (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE``) are exported so libraries that read them agree with us.
    A single process meets nobody (unless torchrun's agent serves its store): it serves its own
    store on the loopback, on a port the kernel assigns while binding, whatever ``MASTER_ADDR`` and
    ``MASTER_PORT`` say (an address left over from another job, unreachable from here, held
    start-up for the whole timeout; a port chosen beforehand can be taken by another process
    first). With several processes a ``MASTER_ADDR`` that does not exist is refused at once.
    Returns the environment actually used (address and port filled in). Idempotent.
    """
    import torch
    import torch.distributed as dist

    env = env or DistEnv.from_env()
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (env.rank, env.world_size):
            raise LaunchError(env.source, [
                f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                f"{dist.get_world_size()}, but the environment says rank {env.rank} of {env.world_size}"], {})
        if env.master_port == 0 and os.environ.get("MASTER_PORT", "").isdigit():  # the port in use
            env = dataclasses.replace(env, master_port=int(os.environ["MASTER_PORT"]))
        return env

    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if cuda:
        count = torch.cuda.device_count()
        if env.local_rank < count:
            torch.cuda.set_device(env.local_rank)
        elif count == 1:
            torch.cuda.set_device(0)
        else:
            raise LaunchError(env.source, [
                f"local rank {env.local_rank} has no GPU: this task sees {count} GPUs "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"], {})

    timeout = datetime.timedelta(minutes=timeout_minutes)
    if env.world_size == 1 and not (env.source == "torchrun" and os.environ.get(AGENT_STORE_ENV) == "True"):
        store = dist.TCPStore(LOOPBACK, 0, 1, is_master=True, timeout=timeout)
        env = dataclasses.replace(env, master_addr=LOOPBACK, master_port=store.port)
        _export(env)
        dist.init_process_group(backend=backend, store=store, rank=0, world_size=1, timeout=timeout)
        return env
    _check_master_addr(env)
    _export(env)
    host = f"[{env.master_addr}]" if ":" in env.master_addr else env.master_addr
    dist.init_process_group(backend=backend, init_method=f"tcp://{host}:{env.master_port}", rank=env.rank,
                            world_size=env.world_size, timeout=timeout)
    return env


#: getaddrinfo's answers for a name that does not exist (a temporary failure, EAI_AGAIN, is left
#: to the rendezvous's own retries)
_NO_SUCH_NAME = {getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, n)}


def _check_master_addr(env: DistEnv) -> None:
    """A ``MASTER_ADDR`` that names no host is an error now, not after the rendezvous timeout."""
    try:
        socket.getaddrinfo(env.master_addr, env.master_port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        if e.errno not in _NO_SUCH_NAME:
            return
        reason = e.strerror
    except UnicodeError as e:  # not a host name at all (an empty or over-long label)
        reason = str(e)
    else:
        return
    raise LaunchError(env.source, [f"MASTER_ADDR {env.master_addr!r} does not resolve to an address ({reason}): "
                                   "it must name rank 0's host"],
                      {"MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port)})


def _export(env: DistEnv) -> None:
    """The standard variables, so that libraries reading them agree with us."""
    os.environ.update({
        "MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port),
        "RANK": str(env.rank), "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank), "LOCAL_WORLD_SIZE": str(env.local_world_size),
    })


if __name__ == "__main__":
    try:
        print(json.dumps(DistEnv.from_env().as_dict()))
    except LaunchError as e:
        print(e, file=sys.stderr)
        sys.exit(1)
