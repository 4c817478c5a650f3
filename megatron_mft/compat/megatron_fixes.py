"""Fixes for megatron-core 0.16 code paths taken when neither Apex nor Transformer Engine is
installed (any device). Applied by ``setup_runtime`` only in that case.

* DistributedOptimizer, 'fully_reshardable' load: torch's Adam keeps a per-parameter ``step``
  tensor that the checkpoint does not carry per parameter (megatron restores it from the param
  groups first), yet ``_set_main_param_and_optimizer_states`` copies every key of the live state
  from the loaded tensors and raises ``KeyError: 'step'``. We pass the already-restored step
  through unchanged.
* The same load assigns one shared ``step`` tensor to every parameter's state; torch's
  foreach Adam then increments it once per parameter per step, corrupting the bias correction
  after a resume. We give each parameter its own copy.
"""

from __future__ import annotations

_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    from megatron.core.optimizer import distrib_optimizer as dopt

    original = dopt.DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_states_keeping_step(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state.get(main_param, {})
            if "step" in state:
                tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    dopt.DistributedOptimizer._set_main_param_and_optimizer_states = _set_states_keeping_step

    original_load = dopt.DistributedOptimizer.load_state_dict

    def _load_with_private_steps(self, state_dict):
        out = original_load(self, state_dict)
        for state in self.optimizer.state.values():
            if "step" in state and hasattr(state["step"], "clone"):
                state["step"] = state["step"].clone()
        return out

    dopt.DistributedOptimizer.load_state_dict = _load_with_private_steps
    _applied = True
