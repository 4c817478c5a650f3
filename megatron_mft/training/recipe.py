"""The training recipe: setup -> train -> save -> cleanup, read top to bottom."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import torch
import yaml
from megatron.core import parallel_state as ps

from megatron_mft.checkpoint.dist import (checkpoints_dir, latest_checkpoint, load_checkpoint, load_model_weights,
                                          resume_checkpoint, save_checkpoint)
from megatron_mft.compat import setup_runtime
from megatron_mft.compat.fsops import make_dirs, replace_file_atomically
from megatron_mft.config import RunConfig
from megatron_mft.config.base import to_dict
from megatron_mft.data import MFTData
from megatron_mft.errors import UsageError, UserError, is_out_of_memory
from megatron_mft.launch.agree import any_rank, every_rank
from megatron_mft.launch.env import read_dist_env
from megatron_mft.loss import build_balancer, task_weights_in_force
from megatron_mft.model import build_model_chunks, check_placement, kernels_line
from megatron_mft.training.oom import out_of_memory_error
from megatron_mft.training.metrics import MetricsLog, Timer, console_line, flop_count, peak_flops, peak_memory_gib
from megatron_mft.training.optimizer import build_optimizer, build_scheduler, total_steps, wrap_ddp
from megatron_mft.training.parallel import init_parallel, teardown
from megatron_mft.training.preflight import check_against_data, check_run
from megatron_mft.training.step import StepContext, evaluate, install_grad_finalizer, train_step

log = logging.getLogger("megatron_mft")


def _rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _say(msg: str) -> None:
    if _rank0():
        print(msg, flush=True)



#: first line of the resolved config the trainer writes into output_dir
RESOLVED_CONFIG_HEADER = "# megatron-mft: the resolved config of this run's latest start (written by train)\n"


def _written_by_train(path: Path) -> bool:
    """``path`` is a resolved config this tool wrote: it starts with the header, or (written before
    the header existed) it holds every section of a run config with (nearly) every key, as only a
    dump does: a hand-written config names a few keys per section."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if text.startswith(RESOLVED_CONFIG_HEADER.rstrip("\n")):
        return True
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    full = to_dict(RunConfig())  # the old dump wrote every section with every key
    if not (isinstance(data, dict) and set(data) == set(full)):
        return False
    for name, section in full.items():  # an older version's dump lacks the fields added since
        if isinstance(section, dict):
            have = data[name]
            if not isinstance(have, dict) or len(set(have) & set(section)) < 0.8 * len(section):
                return False
    return True


def load_starting_weights(run, chunks: list) -> Optional[str]:
    """Load the run's starting weights into ``chunks`` (``model.hf_init`` before
    ``train.init_checkpoint``); returns what was loaded, None when the run starts from random
    weights. The one place for it: the policy and the DPO frozen reference load the same."""
    if run.model.hf_init:
        from megatron_mft.checkpoint.hf import load_hf_into_chunks

        load_hf_into_chunks(run.model.hf_init, chunks, run.model, run.parallel)
        return f"Hugging Face folder {run.model.hf_init}"
    if run.train.init_checkpoint:
        from megatron.core.dist_checkpointing.core import CheckpointingException

        try:
            load_model_weights(run.train.init_checkpoint, chunks)
        except CheckpointingException as e:  # e.g. a checkpoint from before init.json, of another shape
            raise UserError(f"train.init_checkpoint: {run.train.init_checkpoint} does not fit this model: {e}") from e
        return str(run.train.init_checkpoint)
    return None

class Recipe:
    """A whole fine-tuning run. ``Recipe(cfg).run()`` is what ``python -m megatron_mft.train`` does."""

    def __init__(self, run: RunConfig, config_file: Optional[str] = None):
        self.run_cfg = run
        #: the YAML file the config was read from (never overwritten by the resolved config)
        self.config_file = config_file
        self.out = Path(run.output_dir)
        self.step = 0
        self.consumed_rows = 0
        self.stop_reason = None
        self.early_stop = {"best": math.inf, "bad_evals": 0}
        self.nonfinite_in_a_row = 0
        self.lock = None
        self.phase = "start-up (model, optimizer, data)"  # where the run is, for an out-of-memory message
        self.made_dirs: list[Path] = []  # the output_dir folders this start created (rank 0)

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        run = self.run_cfg
        check_run(run, read_dist_env().world_size)  # paths, folders, process count: before anything is built
        self.env = setup_runtime()
        init_parallel(run.parallel, self.env, run.seed)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.env.cuda else torch.device("cpu")
        self._lock_output_dir()
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        mbs, gbs = run.train.micro_batch_size, run.train.global_batch_size
        packed = run.data.batching == "packed"
        self.data = MFTData(run.data, seed=run.seed, micro_batch_size=mbs, global_batch_size=gbs,
                            dp_rank=dp_rank, dp_size=dp_size,
                            pad_to_multiple_of=(run.parallel.tp if run.parallel.sp else 1) * (
                                2 * run.parallel.cp if run.parallel.cp > 1 else 1),
                            fixed_seq_length=run.parallel.pp > 1 and not packed, cp=run.parallel.cp)
        self.task_names = list(self.data.task_names)
        check_against_data(run, self.data)  # before the model is built
        from megatron_mft.training.preference import check_stage

        check_stage(run, self.data.manifest)  # train.stage sft | dpo | orpo against sft / preference data
        self.arch = run.model.arch()
        self.total_steps = total_steps(run, self.data.rows_per_epoch)

        self.ckpt_root = checkpoints_dir(self.out)
        latest = resume_checkpoint(self.ckpt_root, run.train.resume_from)
        if latest is not None:
            self._check_resume_compatible(latest)
        # A full-model resume overwrites every weight: skip the base load. PEFT checkpoints hold
        # only adapters, so their base is loaded as at the start.
        skip_base = latest is not None and run.peft.method == "none"

        # --- peft hook (owned by megatron_mft.peft): adapter layer spec, then freeze/quantise.
        layer = None
        self.peft = None
        if run.peft.method != "none":
            from megatron_mft.peft import PeftPlan

            self.peft = PeftPlan(run.peft, self.env)
            layer = self.peft.layer_spec(run.model)
        chunks = build_model_chunks(run.model, run.parallel, self.env, layer=layer)
        _say(kernels_line(chunks, self.env, packed=packed))
        if skip_base:
            _say("resuming a full-model checkpoint: its weights replace the base, which is not loaded")
        else:
            self._load_base_weights(chunks)
        if self.peft is not None:
            self.peft.prepare(chunks)
        # --- end peft hook
        self.chunks = wrap_ddp(chunks, run)
        install_grad_finalizer(self.chunks)
        self.optimizer = build_optimizer(self.chunks, run)
        self.scheduler = build_scheduler(self.optimizer, run, self.total_steps)
        self.balancer = build_balancer(run.loss, len(self.task_names)) if run.loss.balancer != "none" else None
        self.ctx = StepContext(loss_cfg=run.loss, task_names=self.task_names, device=self.device, packed=packed,
                               stage=run.train.stage)
        if self.arch.num_experts:
            from megatron_mft.model.moe import RouterLoad

            self.ctx.router = RouterLoad(self.chunks, run.model, run.parallel)
        if run.train.stage == "dpo":  # reference log-probs from the starting weights (training.reference)
            from megatron_mft.training.reference import build_reference

            self.ctx.reference = build_reference(self, fresh=latest is None)
        self._report_params()

        from megatron_mft.launch.signals import PreemptionGuard

        self.guard = PreemptionGuard(exit_duration_minutes=run.train.exit_duration_minutes)
        self.resumed_from = latest
        if latest is not None:
            self._resume(latest)
        # every weight, buffer and NF4 code on the training device, or an error naming it now
        # (instead of a device-mismatch kernel error deep in the first step)
        check_placement(self.chunks, self.device)
        self.metrics = MetricsLog(self.out, enabled=_rank0(), tensorboard=run.train.tensorboard,
                                  first_step=None if self.finished else self.step + 1)
        if not self.finished:  # this start logs the steps after self.step: one series in metrics.jsonl
            was = self.metrics.own_file()
            if was:
                _say(f"{self.metrics.path} was {was}; it is now this run's own file (a copy of its lines), and "
                     f"what it linked to is left as it was")
            moved = self.metrics.set_aside_after(self.step)
            if moved:
                _say(f"moved {moved[0]} line(s) of steps after {self.step} from {self.metrics.path} to {moved[1]}: "
                     f"an earlier start logged them, and this run logs those steps again")
        if _rank0() and not self.finished:  # a finished run's files keep describing the run that trained it
            self._write_resolved_config()
        self.peak = peak_flops(self.env.device_name, run.train.peak_flops)
        _say(f"tasks: {', '.join(self.task_names)} | rows/epoch {self.data.rows_per_epoch} | "
             f"steps {self.total_steps} | layout tp={run.parallel.tp} pp={run.parallel.pp} "
             f"vpp={run.parallel.vpp} cp={run.parallel.cp} dp={dp_size} sp={run.parallel.sp}")

    def _write_resolved_config(self) -> None:
        """The resolved config of this start (replaced at each start) as ``output_dir/config.yaml``,
        else ``config.resolved.yaml``: a file there that this tool did not write (the user's own) or
        the very file passed as --config is never replaced."""
        self.out.mkdir(parents=True, exist_ok=True)

        def free(path: Path) -> bool:
            if not path.exists():
                return True
            given = self.config_file is not None and path.samefile(self.config_file)
            return not given and _written_by_train(path)

        names = ("config.yaml", "config.resolved.yaml")
        path = next((self.out / n for n in names if free(self.out / n)), None)
        if path is None:
            _say(f"note: the resolved config is not written: {' and '.join(names)} in {self.out} are not this "
                 f"tool's (or are the --config file)")
            return
        if path.name != names[0]:
            _say(f"note: {self.out / names[0]} is kept (not written by this tool, or the --config file); the "
                 f"resolved config of this run is in {path}")
        text = RESOLVED_CONFIG_HEADER + yaml.safe_dump(to_dict(self.run_cfg), sort_keys=False)
        replace_file_atomically(str(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def _lock_output_dir(self) -> None:
        """One run per output_dir (launch.runlock): rank 0 holds the lock; every rank stops if it
        cannot be taken."""
        from megatron_mft.launch.runlock import RunLock, RunLockError

        error = None
        if _rank0():
            try:
                self.made_dirs = make_dirs(self.out)
                self.lock = RunLock(self.out).acquire()
            except RunLockError as e:
                error = e
            except OSError as e:  # every rank must hear of it (they wait in any_rank below)
                why = (e.strerror or str(e)) + (f": {e.filename}" if e.filename else "")
                error = UserError(f"output_dir {self.out}: cannot create it or its lock: {why}")
        refused = any_rank(error is not None)
        if error is not None:
            raise error
        if refused:
            raise UserError(f"output_dir {self.out}: rank 0 could not take it (in use by another run, or "
                            f"not creatable; rank 0 says which)")
        if self.lock is not None and self.lock.note:
            _say(f"note: {self.lock.note}")

    def _remove_unused_dirs(self) -> None:
        """A start that fails in setup (a refused resume, bad data...) leaves no empty output_dir
        behind: after the lock's release, the folders this start created are removed while empty
        (rmdir never removes a folder with anything in it, nor one that existed before)."""
        for folder in reversed(self.made_dirs):
            try:
                folder.rmdir()
            except OSError:
                break

    def _check_resume_compatible(self, path: Path) -> None:
        """Refuse a config that does not continue the checkpoint's run (one message, every
        difference); report the safe changes (checkpoint.resume_check)."""
        import json

        from megatron_mft.checkpoint.resume_check import resume_differences

        try:
            saved = json.loads((path / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"checkpoint {path} is damaged: {path / 'run.json'} is unreadable ({e})") from e
        refused, changed = resume_differences(saved, self.run_cfg, self.data.manifest, self.task_names,
                                              source=str(path / "run.json"))
        if refused:
            raise UsageError(f"the config does not continue the run saved in {path}: " + "; ".join(refused)
                             + ". Restore those settings to resume, or start a new run in a new output_dir "
                               "(train.init_checkpoint / model.hf_init for its weights).")
        if changed:
            _say(f"resuming {path} with changed settings: " + ", ".join(changed))

    def _load_base_weights(self, chunks: list) -> None:
        """Pretrained weights, before DDP and the optimizer copy them: HF folder or dist checkpoint."""
        source = load_starting_weights(self.run_cfg, chunks)
        if source:
            _say(f"initialised weights from {source}")

    def _report_params(self) -> None:
        if self.peft is not None:  # prepare() logged the trainable share (NF4 base included)
            _say(self.peft.memory_report(self.arch, self.run_cfg))
            return
        local = sum(p.numel() for c in self.chunks for p in c.parameters())
        vec = torch.tensor([local], dtype=torch.float64, device=self.device)
        # parameters are disjoint across TP and PP ranks of one data-parallel replica
        torch.distributed.all_reduce(vec, group=ps.get_model_parallel_group())
        _say(f"parameters: {vec.item() / 1e6:.2f}M on this layout (norms counted once per TP rank), "
             f"all trainable; {self.arch.num_params() / 1e6:.2f}M in the architecture")

    def _common_state(self) -> dict:
        return {"step": self.step, "consumed_rows": self.consumed_rows,
                "scheduler": self.scheduler.state_dict(),
                "balancer": self.balancer.state_dict() if self.balancer is not None else None,
                "early_stop": dict(self.early_stop)}

    def _resume(self, path: Path) -> None:
        common = load_checkpoint(path, [c.module for c in self.chunks], self.optimizer,
                                 trainable_only=self.peft is not None)
        self.step = int(common["step"])
        self.consumed_rows = int(common["consumed_rows"])
        self.scheduler.load_state_dict(common["scheduler"])
        if self.balancer is not None and common.get("balancer") is not None:
            self.balancer.load_state_dict(common["balancer"])
        self.early_stop = dict(common.get("early_stop") or self.early_stop)
        _say(f"resumed from {path} at step {self.step} (consumed rows {self.consumed_rows})")

    # ---------------------------------------------------------------- train
    def task_weights(self) -> torch.Tensor:
        return task_weights_in_force(self.run_cfg.loss, self.task_names, self.balancer).to(self.device)

    @property
    def finished(self) -> bool:
        """The run (resumed) is already at its last step: nothing to train, nothing to save."""
        return self.step >= self.total_steps

    def train(self) -> None:
        t = self.run_cfg.train
        if self.finished:  # a re-save would record this start's config for weights trained with another
            length = "train.steps" if t.steps > 0 else "train.epochs"
            _say(f"nothing to train: the checkpoint {self.resumed_from} is at step {self.step}, the last of this "
                 f"run's {self.total_steps}; nothing trained or saved. To train longer raise {length}, or start a "
                 f"new run in another output_dir")
            return
        timer = Timer()
        tokens_since, flops_since = 0, [0.0, 0.0]  # model, hardware
        cp_pad_since = 0  # tokens the data path added so packed samples divide 2 x cp
        while self.step < self.total_steps:
            self.phase = f"step {self.step + 1}"
            cp_pad_before = self.data.cp_padding_tokens
            micro_batches = self.data.train_micro_batches(self.consumed_rows)
            cp_pad_since += self.data.cp_padding_tokens - cp_pad_before
            self.ctx.task_weights = self.task_weights()
            self.ctx.consumed_rows = self.consumed_rows
            out = train_step(self.chunks, self.optimizer, self.scheduler, micro_batches, self.ctx)
            self.step += 1
            self.consumed_rows += t.global_batch_size
            n_tok, segs = _count_tokens(micro_batches)
            tokens_since += n_tok
            count = flop_count(self.arch, segs, self.run_cfg.peft, self.run_cfg.model.recompute,
                               reference_forward=getattr(self.ctx.reference, "per_step_forward", False))
            flops_since = [flops_since[0] + count.model, flops_since[1] + count.hardware]
            if self.step % t.log_interval == 0 or self.step == self.total_steps:
                dt = timer.lap()
                self._log_step(out, tokens_since, flops_since, dt, cp_pad_since)
                tokens_since, flops_since, cp_pad_since = 0, [0.0, 0.0], 0
            self._check_finite(out)
            if self.step == 3 and self.peft is not None:
                _say(self.peft.peak_memory_line())
            if self._should_validate():
                self._validate()
            if t.save_interval and self.step % t.save_interval == 0 and self.step < self.total_steps:
                self.save()
            self.stop_reason = self.stop_reason or self.guard.should_stop()
            if self.stop_reason:
                _say(f"stopping at step {self.step}: {self.stop_reason}")
                break
        self.save()

    def _check_finite(self, out: dict) -> None:
        """A step with a non-finite loss or grad norm was skipped (no update, train_step); stop
        once more than train.max_nonfinite_steps come in a row. Nothing is saved: the last
        checkpoint stays the newest."""
        if not out.get("nonfinite"):
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        allowed = self.run_cfg.train.max_nonfinite_steps
        what = f"loss {out['loss']}, grad norm {out['grad_norm']}"
        if self.nonfinite_in_a_row > allowed:
            kept = latest_checkpoint(self.ckpt_root)
            raise UserError(
                f"step {self.step}: non-finite {what} ({self.nonfinite_in_a_row} such step(s) in a row, "
                f"train.max_nonfinite_steps={allowed}); stopped without saving, and the weights were not updated "
                f"by it. {f'The newest checkpoint is {kept}.' if kept else 'No checkpoint was saved.'} "
                f"Check the loss settings and learning rate (or allow skips with train.max_nonfinite_steps).")
        _say(f"warning: step {self.step}: non-finite {what}; update skipped "
             f"({self.nonfinite_in_a_row} of {allowed} allowed in a row)")

    def _log_step(self, out: dict, tokens: int, flops: list[float], dt: float, cp_padding: int) -> None:
        """Throughput is global (summed over DP); FLOPs per GPU divide by the world size.
        ``flops`` = [model, hardware]: MFU from model FLOPs, hw_tflops_per_gpu adds recompute.
        ``cp_padding``: this rank's CP padding tokens of the interval (the CP group shares rows)."""
        world = torch.distributed.get_world_size()
        vec = torch.tensor([tokens, *flops, cp_padding], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(vec, group=ps.get_data_parallel_group())
        tokens, flops, hw_flops, cp_padding = vec.tolist()
        tflops = flops / dt / world / 1e12
        rec = {"step": self.step, "loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"],
               "tokens_per_s": tokens / dt, "tflops_per_gpu": tflops,
               "hw_tflops_per_gpu": hw_flops / dt / world / 1e12,
               "mfu": (tflops * 1e12 / self.peak) if self.peak else None,
               "consumed_rows": self.consumed_rows, "peak_mem_gib": peak_memory_gib(),
               "cp_padding_tokens": int(cp_padding),
               **{k: v for k, v in out.items()
                  if k.startswith(("task_", "rewards/", "logps/", "pref_loss", "nll_", "router_", "expert_load"))}}
        self.metrics.write(rec)
        _say(console_line(rec, self.total_steps))

    def _should_validate(self) -> bool:
        t, loss = self.run_cfg.train, self.run_cfg.loss
        due_eval = t.eval_interval and self.step % t.eval_interval == 0
        due_bal = (self.balancer is not None and self.step >= loss.balancer_warmup
                   and self.step % loss.balancer_interval == 0)
        return bool(due_eval or due_bal)

    def _validate(self) -> None:
        self.phase = f"validation after step {self.step}"
        for c in self.chunks:
            c.eval()
        losses = {}
        for i, name in enumerate(self.task_names):
            mbs = self.data.val_micro_batches(name, self.run_cfg.train.eval_iters)
            ce, n = evaluate(self.chunks, mbs, self.ctx)
            if n:
                losses[i] = ce / n
        for c in self.chunks:
            c.train()
        rec = {"step": self.step, **{f"val_loss/{self.task_names[i]}": v for i, v in losses.items()}}
        if self.balancer is not None and self.step >= self.run_cfg.loss.balancer_warmup:
            self.balancer.update(self.step, losses)
            # the same quantity as the training records' task_weight/* (static x balancer)
            rec.update({f"task_weight/{n}": w for n, w in zip(self.task_names, self.task_weights().tolist())})
        self.metrics.write(rec)
        _say("validation: " + " ".join(f"{self.task_names[i]}={v:.4f}" for i, v in losses.items()))
        patience = self.run_cfg.train.early_stopping_patience
        if patience and losses:
            mean = sum(losses.values()) / len(losses)
            if mean < self.early_stop["best"]:
                self.early_stop = {"best": mean, "bad_evals": 0}
            else:
                self.early_stop["bad_evals"] += 1
                if self.early_stop["bad_evals"] >= patience:
                    self.stop_reason = f"early stopping: validation loss has not improved for {patience} evaluations"

    # ---------------------------------------------------------------- save / cleanup
    def _weights_finite(self) -> bool:
        """Every rank's parameters are finite (a MIN all-reduce over the world)."""
        finite = [torch.isfinite(p).all() for c in self.chunks for p in c.parameters()]
        return every_rank(bool(torch.stack(finite).all()))  # one host sync, not one per tensor

    def save(self) -> None:
        self.phase = f"the checkpoint save of step {self.step}"
        if not self._weights_finite():
            raise UserError(f"step {self.step}: the weights hold NaN/inf; not saving a checkpoint over "
                            f"{self.ckpt_root} (the newest one there is kept)")
        info = {"config": to_dict(self.run_cfg), "task_names": self.task_names,
                "consumed_rows": self.consumed_rows, "peak_mem_gib": peak_memory_gib(), "manifest": self.data.manifest,
                "peft": self.run_cfg.peft.method}
        path = save_checkpoint(self.ckpt_root, self.step, [c.module for c in self.chunks], self.optimizer,
                               common=self._common_state(), run_info=info,
                               trainable_only=self.peft is not None)
        _say(f"saved checkpoint {path}")

    def cleanup(self, after_error: bool = False) -> None:
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        if getattr(self, "guard", None) is not None:
            self.guard.uninstall()
        if self.lock is not None:
            self.lock.release()
        teardown(after_error=after_error)

    def run(self) -> int:
        """setup + train, then cleanup, also after an error: a start refused in setup ends its process
        group too (gloo aborts at exit otherwise). Out of memory, also wrapped (a distributed
        checkpoint's CheckpointException is a BaseException), becomes one message."""
        try:
            self.setup()
            self.train()
        except BaseException as e:
            try:  # a failing cleanup never hides the error in flight: its own failure is one line
                self.cleanup(after_error=True)
                self._remove_unused_dirs()
            except Exception as failed:  # noqa: BLE001
                _say(f"note: cleaning up after the error failed too: {type(failed).__name__}: {failed}")
            if not isinstance(e, (KeyboardInterrupt, SystemExit)) and is_out_of_memory(e):
                raise out_of_memory_error(e, self.run_cfg, self.phase) from e
            raise
        self.cleanup()
        return 0


def _count_tokens(micro_batches: list[dict]) -> tuple[int, list[int]]:
    """Real (non-padding) tokens and the lengths of the samples in them, for throughput."""
    n, lengths = 0, []
    for mb in micro_batches:
        ids = mb["sample_ids"]
        real = ids[ids >= 0]
        n += int(real.numel())
        if real.numel():
            lengths += torch.bincount(real).tolist()
    return n, [x for x in lengths if x]
