"""Launcher environment: host lists, torchrun/SLURM parsing, errors, and a simulated 2x2 SLURM job."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mft.launch.env import (AGENT_STORE_ENV, DistEnv, LaunchError, default_port, launcher_store,
                                     parse_tasks_per_node)
from megatron_mft.launch.hostnames import HostListError, expand_nodelist

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ host lists

@pytest.mark.parametrize("text, hosts", [
    ("node01", ["node01"]),
    ("gpu[001-003,007],cpu5", ["gpu001", "gpu002", "gpu003", "gpu007", "cpu5"]),
    ("node[01-04]", ["node01", "node02", "node03", "node04"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("r[1-2]n[1,3]", ["r1n1", "r1n3", "r2n1", "r2n3"]),
    ("a[1-2],b,c[5]", ["a1", "a2", "b", "c5"]),
    ("gpu-a100-[1-2].cluster", ["gpu-a100-1.cluster", "gpu-a100-2.cluster"]),
    ("localhost,localhost", ["localhost", "localhost"]),
])
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("text", ["", "gpu[1-3", "gpu1-3]", "gpu[3-1]", "gpu[a-b]", "a,,b", "g[[1]]"])
def test_expand_nodelist_rejects(text):
    with pytest.raises(HostListError):
        expand_nodelist(text)


def test_hostnames_cli():
    run = subprocess.run([sys.executable, "-m", "megatron_mft.launch.hostnames", "gpu[001-002],cpu5"],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    assert run.stdout.split() == ["gpu001", "gpu002", "cpu5"]
    run = subprocess.run([sys.executable, "-m", "megatron_mft.launch.hostnames", "--first"],
                         capture_output=True, text=True, cwd=ROOT, check=True,
                         env={**os.environ, "SLURM_JOB_NODELIST": "node[07-09]"})
    assert run.stdout.strip() == "node07"
    assert "torch" not in run.stderr


# ------------------------------------------------------------------------- tasks per node

@pytest.mark.parametrize("text, out", [("8", [8]), ("2(x2)", [2, 2]), ("2(x3),1", [2, 2, 2, 1]), ("4,2", [4, 2])])
def test_parse_tasks_per_node(text, out):
    assert parse_tasks_per_node(text) == out


def test_default_port():
    assert default_port("123456") == 13456  # 10000 + job id mod 20000: inside 10000-29999
    assert default_port("777") == 10777
    assert default_port(None) == 29500
    assert default_port("4242_7") == 12427  # array job "4242_7" counts as 42427


# --------------------------------------------------------------------------------- parsing

def slurm_task(rank, *, nodes=2, per_node=2, **extra):
    env = {
        "SLURM_JOB_ID": "4711", "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(nodes * per_node),
        "SLURM_LOCALID": str(rank % per_node), "SLURM_NODEID": str(rank // per_node),
        "SLURM_NNODES": str(nodes), "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})",
        "SLURM_JOB_NODELIST": f"node[01-{nodes:02d}]",
    }
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def test_single_process():
    for env in ({}, {"MASTER_ADDR": "10.9.9.9", "MASTER_PORT": "not-a-port"}):  # leftovers are not read
        e = DistEnv.from_env(env)
        assert (e.rank, e.world_size, e.local_rank, e.node_rank, e.source) == (0, 1, 0, 0, "single")
        assert (e.master_addr, e.master_port) == ("127.0.0.1", 0)  # init serves the store on a port it is given


def test_slurm_2x2():
    envs = [DistEnv.from_env(slurm_task(r)) for r in range(4)]
    assert [(e.rank, e.local_rank, e.node_rank) for e in envs] == [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]
    for e in envs:
        assert (e.world_size, e.local_world_size, e.num_nodes, e.source) == (4, 2, 2, "slurm")
        assert (e.master_addr, e.master_port) == ("node01", default_port("4711"))


def test_slurm_node_rank_from_block_distribution_and_uneven_nodes():
    # 3 + 1 tasks on two nodes, no SLURM_NODEID: rank 3 is the only task of node 1
    env = slurm_task(3, SLURM_NODEID=None, SLURM_LOCALID="0", SLURM_TASKS_PER_NODE="3,1")
    e = DistEnv.from_env(env)
    assert (e.node_rank, e.local_rank, e.local_world_size) == (1, 0, 1)


def test_slurm_ntasks_per_node_and_step_vars():
    env = slurm_task(5, nodes=2, per_node=4, SLURM_TASKS_PER_NODE=None, SLURM_NTASKS_PER_NODE="4")
    e = DistEnv.from_env(env)
    assert (e.node_rank, e.local_rank, e.local_world_size, e.world_size) == (1, 1, 4, 8)
    # an srun step on 2 of the job's 4 nodes: the step's variables win
    env = slurm_task(1, nodes=4, per_node=1, SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NUM_NODES="2",
                     SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_STEP_NODELIST="node[03-04]", SLURM_NODEID="1")
    e = DistEnv.from_env(env)
    assert (e.world_size, e.num_nodes, e.master_addr) == (2, 2, "node03")


def test_slurm_master_override():
    e = DistEnv.from_env(slurm_task(2, MASTER_ADDR="10.0.0.5", MASTER_PORT="31337"))
    assert (e.master_addr, e.master_port) == ("10.0.0.5", 31337)


def test_torchrun_wins_inside_srun():
    env = slurm_task(0, nodes=2, per_node=1, SLURM_TASKS_PER_NODE="1(x2)")
    env.update(RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_WORLD_SIZE="4", GROUP_RANK="1",
               MASTER_ADDR="node01", MASTER_PORT="29400")
    e = DistEnv.from_env(env)
    assert (e.source, e.rank, e.world_size, e.local_rank, e.local_world_size, e.node_rank, e.num_nodes) == \
        ("torchrun", 5, 8, 1, 4, 1, 2)


def test_forced_launcher():
    env = slurm_task(1, SLURM_NTASKS="8")  # would be inconsistent as SLURM
    assert DistEnv.from_env({**env, "MFT_LAUNCHER": "single"}).source == "single"


@pytest.mark.parametrize("env, needles", [
    (slurm_task(4), ["SLURM_PROCID=4 must be < SLURM_NTASKS=4"]),
    (slurm_task(1, SLURM_LOCALID="2"), ["SLURM_LOCALID=2 must be < tasks on this node = 2"]),
    (slurm_task(1, SLURM_NTASKS="6"), ["SLURM_NTASKS=6 != nodes x tasks per node", "= 4"]),
    (slurm_task(1, SLURM_NNODES="3"), ["has 2 hosts but SLURM_NNODES=3"]),
    (slurm_task(1, SLURM_JOB_NODELIST=None, SLURM_NNODES=None), ["no master address"]),
    (slurm_task(1, SLURM_JOB_NODELIST="node[01-02"), ["never closed"]),
    (slurm_task(1, SLURM_PROCID="x"), ["SLURM_PROCID='x' is not an integer"]),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h"}, ["RANK=2 must be < WORLD_SIZE=2"]),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, ["MASTER_ADDR is not set"]),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h"},
     ["LOCAL_RANK=3 must be < LOCAL_WORLD_SIZE=2"]),
    ({"RANK": "1", "WORLD_SIZE": "6", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "2",
      "MASTER_ADDR": "h"}, ["WORLD_SIZE=6 != GROUP_WORLD_SIZE=2 x LOCAL_WORLD_SIZE=2"]),
])
def test_inconsistent_environment_is_named(env, needles):
    with pytest.raises(LaunchError) as info:
        DistEnv.from_env(env)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, msg
    assert "variables:" in msg


# ----------------------------------------------------- 2 nodes x 2 tasks, 4 processes, gloo

WORKER = r"""
import json, os, sys
import torch, torch.distributed as dist
from megatron_mft.launch.env import DistEnv, init_distributed
env = init_distributed(DistEnv.from_env(), backend="gloo", timeout_minutes=2)
t = torch.tensor([float(env.rank + 1)])
dist.all_reduce(t)
ranks = [None] * env.world_size
dist.all_gather_object(ranks, (env.rank, env.node_rank, env.local_rank))
print(json.dumps({**env.as_dict(), "sum": t.item(), "dist_rank": dist.get_rank(),
                  "dist_world": dist.get_world_size(), "gathered": ranks}))
dist.destroy_process_group()
"""

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
               "MASTER_ADDR", "MASTER_PORT", "MFT_LAUNCHER")


def _no_launcher_env() -> dict:
    """This process's environment without any launcher's variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in LAUNCH_VARS}


def test_simulated_slurm_job_2_nodes_x_2_tasks():
    """The environment of `srun -N2 --ntasks-per-node=2` on node[01-02]; node01 is this machine.

    MASTER_ADDR=127.0.0.1 plays the documented override (an address for the first host);
    MASTER_PORT names a store this test serves (every rank joins it as a client, the switch
    torchrun sets for its workers) instead of the job-id port, which other jobs may hold.
    """
    base = _no_launcher_env()
    store = launcher_store(4)  # served here: no port picked for the ranks to race for
    base.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port),
                **{AGENT_STORE_ENV: "True"})
    procs = []
    for rank in range(4):
        env = {**base, **slurm_task(rank)}
        if rank == 3:  # one task without SLURM_NODEID: derived from the block layout
            env.pop("SLURM_NODEID")
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    expected = [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]  # (rank, node_rank, local_rank)
    assert [(r["rank"], r["node_rank"], r["local_rank"]) for r in reports] == expected
    for r in reports:
        assert r["source"] == "slurm"
        assert (r["world_size"], r["local_world_size"], r["num_nodes"]) == (4, 2, 2)
        assert (r["dist_rank"], r["dist_world"]) == (r["rank"], 4)
        assert r["sum"] == 1 + 2 + 3 + 4
        assert [tuple(g) for g in r["gathered"]] == expected


# ----------------------------------------------------- a single process meets nobody

ADDRESS = r"""
import json, os, sys, time
import torch, torch.distributed as dist
from megatron_mft.launch.env import DistEnv, LaunchError, init_distributed
addr, port, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t0 = time.monotonic()
try:  # a short rendezvous timeout: the old behaviour waits it out, then raises DistNetworkError
    env = init_distributed(DistEnv(0, world, 0, world, 0, addr, port, "single", 1), backend="gloo",
                           timeout_minutes=0.1)
    t = torch.ones(1)
    dist.all_reduce(t)
    served = dist.distributed_c10d._get_default_store().underlying_store  # the group's TCPStore: ours
    print(json.dumps({"addr": env.master_addr, "port": env.master_port, "sum": t.item(), "served": served.port,
                      "exported": [os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])]}))
    dist.destroy_process_group()
except LaunchError as e:
    print(json.dumps({"launch_error": str(e), "seconds": time.monotonic() - t0}))
"""


def _address_case(addr: str, port: int, world: int) -> dict:
    run = subprocess.run([sys.executable, "-c", ADDRESS, addr, str(port), str(world)], cwd=ROOT, text=True,
                         env={**_no_launcher_env(), "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_rendezvous_addresses_that_cannot_work_do_not_hold_start_up():
    """A single process needs no address: a MASTER_ADDR left from another job (192.0.2.1 is
    TEST-NET-1, never routed; a name that does not resolve) is not waited for and a MASTER_PORT
    another process holds is not bound: its store is served on the loopback, on a port the kernel
    assigns (no port picked and bound again later, which another process could take in between).
    With several processes a MASTER_ADDR that does not resolve is refused at once."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        for addr, port in (("192.0.2.1", 0), ("no-such-host.invalid", 0), ("192.0.2.1", taken.getsockname()[1])):
            r = _address_case(addr, port, 1)
            assert (r["addr"], r["sum"], r["exported"]) == ("127.0.0.1", 1.0, ["127.0.0.1", r["port"]]), r
            assert r["served"] == r["port"] not in (0, taken.getsockname()[1]), r
    r = _address_case("no-such-host.invalid", 29500, 2)
    assert "MASTER_ADDR 'no-such-host.invalid' does not resolve" in r["launch_error"] and r["seconds"] < 30, r


def test_every_process_that_starts_torch_distributed_ends_it():
    """A gloo group left up when the interpreter exits can abort the process (SIGABRT, "terminate
    called without an active exception", pytorch#190489) after its work is done: CI once failed
    on a MoE parity run whose results were all printed. Every file that starts a group (command,
    test script, worker, bench) also ends it."""
    import re

    starts = re.compile(r"\b(init_distributed|join_launcher_store|init_process_group)\(")
    ends = re.compile(r"\b(teardown|destroy_process_group)\(")
    files = [p for d in ("megatron_mft", "tests", "tools") for p in sorted((ROOT / d).rglob("*.py"))
             if "__pycache__" not in p.parts and p.name != "env.py"]
    # a program's own file also starts one through training.parallel.init_parallel
    entry = re.compile(r"\binit_parallel\(.*?__name__ == .__main__.", re.S)
    starting = [p for p in files if starts.search(p.read_text(encoding="utf-8")) or entry.search(p.read_text(encoding="utf-8"))]
    assert len(starting) > 10  # the scan sees the commands, test scripts and benches
    assert [str(p.relative_to(ROOT)) for p in starting if not ends.search(p.read_text(encoding="utf-8"))] == []
