"""What each data-parallel rank holds of the distributed optimizer's checkpoint state (torchrun,
2 processes, DP=2): after one optimizer step, ``optimizer_sharded_state`` per rank, the
collectives it issued, then a save and a load of the whole checkpoint. Prints
``RESULT {json}`` on rank 0."""

import json
import sys
import tempfile

import torch

from megatron_mft.compat import setup_runtime
from megatron_mft.launch.env import init_distributed, read_dist_env


def main() -> None:
    env = setup_runtime()
    init_distributed(read_dist_env(), backend="gloo")
    from megatron_mft.checkpoint.dist import load_checkpoint, model_sharded_state_dict, save_checkpoint
    from megatron_mft.checkpoint.optimizer_state import optimizer_sharded_state
    from megatron_mft.config import load_config
    from megatron_mft.model import build_model_chunks
    from megatron_mft.training.optimizer import build_optimizer, wrap_ddp
    from megatron_mft.training.parallel import init_parallel

    cfg = load_config(None, ["data.path=/unused", "model.num_layers=2", "train.warmup_steps=0"])
    init_parallel(cfg.parallel, env, cfg.seed)
    chunks = wrap_ddp(build_model_chunks(cfg.model, cfg.parallel, env), cfg)
    opt = build_optimizer(chunks, cfg)
    params = [p for c in chunks for p in c.parameters()]
    for i, p in enumerate(params):
        p.main_grad.fill_(0.01 * (i + 1))
    opt.step()

    calls = []
    real = {n: getattr(torch.distributed, n) for n in ("all_gather", "gather")}

    def spy(name):
        def call(*a, **k):
            calls.append(name)
            return real[name](*a, **k)
        return call

    for n in real:
        setattr(torch.distributed, n, spy(n))
    state = optimizer_sharded_state(opt, model_sharded_state_dict(chunks))
    for n, f in real.items():
        setattr(torch.distributed, n, f)
    held = [t for tensors in state.get("param_state", {}).values() for t in tensors.values()]
    mine = {"tensors": len(held), "numel": sum(t.data.numel() for t in held), "calls": sorted(set(calls)),
            "params": sum(p.numel() for p in params)}

    # the whole checkpoint round trip at DP=2: the optimizer state comes back on every rank
    def moments():
        return [v for st in opt.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim()]

    before = [v.clone() for v in moments()]
    root = [tempfile.mkdtemp() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(root, src=0)
    save_checkpoint(root[0], 1, [c.module for c in chunks], opt, common={"step": 1}, run_info={"step": 1})
    for v in moments():
        v.zero_()
    load_checkpoint(f"{root[0]}/step_0000001", [c.module for c in chunks], opt)
    mine["restored"] = len(before) > 0 and all(torch.equal(a, b) for a, b in zip(before, moments()))
    mine["moments"] = len(before)

    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps(gathered), flush=True)


if __name__ == "__main__":
    from megatron_mft.training.parallel import teardown

    try:
        main()
    finally:
        teardown()
    sys.exit(0)
