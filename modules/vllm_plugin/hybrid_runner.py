"""The hybrid rule inside vLLM 0.32's model runner: one HybridLookup per request, applied after the draft.

`install()` (called by the plugin's register(), once per process) wraps two methods:
  - GPUModelRunner.propose_draft_token_ids: the draft proposes [num_reqs, K] tokens as always (so its own
    state, KV cache included, stays what vLLM keeps), then each greedy request's lookup state is brought up to
    date (prompt + accepted tokens + this step's sampled tokens) and, where the rule matches
    (modules/decode/hybrid.py), the lookup's K tokens overwrite that request's row. The runner copies that
    tensor to the scheduler and feeds it to the next verify, so the target checks the lookup's tokens and the
    rejection sampler accepts them greedily as it would any draft's. Requests that sample (temperature > 0),
    and requests still in prefill, keep the draft's tokens: the lookup has no probabilities to sample with.
  - EngineArgs.create_speculative_config: the export check (modules/draft/export_check.py) of a speculative
    model folder written by train/export.py (its config names a `target_model`, as every export does).
EAGLE_HYBRID_CONTROL=corrupt (tests only: the control that must fail) adds 1 to every lookup token.
"""
import json
import os
from pathlib import Path

from modules.decode.hybrid import HybridLookup
from modules.export import engines

CONTROL_ENV = "EAGLE_HYBRID_CONTROL"
PLACEHOLDER = -1  # vLLM's id for a rejected slot in sampled_token_ids (v1/sample/rejection_sampler.py)


class HybridRequests:
    """The rule's state for the requests of one runner: {request id: HybridLookup}."""

    def __init__(self, min_match: int, corrupt: bool = False):
        self.min_match, self.corrupt = min_match, corrupt
        self.lookups: dict[str, HybridLookup] = {}
        self.steps = self.replaced = 0  # request-steps seen, and those whose draft the lookup replaced

    def apply(self, runner, drafts, sampled):
        """drafts [num_reqs, K] (overwritten in place where the rule matches); sampled: this step's tokens, a
        [num_reqs, K+1] tensor with PLACEHOLDER for rejected slots (vLLM's padded drafter batch, the default)
        or per-request lists after vLLM's bookkeeping (disable_padded_drafter_batch)."""
        import torch

        if not torch.is_tensor(drafts):
            return drafts
        batch = runner.input_batch
        req_ids = batch.req_ids[:drafts.shape[0]]
        self.lookups = {r: self.lookups[r] for r in req_ids if r in self.lookups}  # drop finished requests
        new_rows = sampled.tolist() if torch.is_tensor(sampled) else None  # not yet in token_ids_cpu
        discard = runner.discard_request_mask.np
        for i, req_id in enumerate(req_ids):
            if req_id is None or discard[i] or req_id not in batch.greedy_reqs:
                continue
            lookup = self.lookups.get(req_id)
            if lookup is None:
                lookup = self.lookups[req_id] = HybridLookup(drafts.shape[1], self.min_match)
            known = int(batch.num_tokens_no_spec[i])
            lookup.extend(batch.token_ids_cpu[i, len(lookup.context):known].tolist())
            if new_rows is not None:
                lookup.extend([t for t in new_rows[i] if 0 <= t < batch.vocab_size])
            self.steps += 1
            tokens = lookup.lookup()
            if tokens is not None:
                if self.corrupt:
                    tokens = [(t + 1) % batch.vocab_size for t in tokens]
                drafts[i] = torch.tensor(tokens, dtype=drafts.dtype, device=drafts.device)
                self.replaced += 1
        return drafts


def hybrid_of(runner):
    """The runner's HybridRequests, made on first use from its draft's config.json; None for no hybrid field."""
    if not hasattr(runner, "_eagle_hybrid"):
        spec = getattr(runner, "speculative_config", None)
        config = draft_config(getattr(spec, "model", None))
        min_match = engines.read_hybrid_min_match(config or {})
        runner._eagle_hybrid = HybridRequests(min_match, os.environ.get(CONTROL_ENV) == "corrupt") \
            if min_match else None
    return runner._eagle_hybrid


def draft_config(model) -> dict | None:
    """A local draft folder's config.json, None for anything else (a hub id, no speculative model)."""
    if not model or not (Path(model) / "config.json").is_file():
        return None
    return json.loads((Path(model) / "config.json").read_text())


def check_our_export(model) -> None:
    """Refuse (one line) an incomplete export written by train/export.py; other folders pass untouched."""
    from modules.draft.export_check import check_export

    config = draft_config(model)
    if config is not None and "target_model" in config:
        check_export(model)


def install():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_eagle_hybrid_installed", False):
        return
    propose, create_spec = GPUModelRunner.propose_draft_token_ids, EngineArgs.create_speculative_config

    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, *args, **kwargs):
        drafts = propose(self, scheduler_output, sampled_token_ids, *args, **kwargs)
        hybrid = hybrid_of(self)
        return drafts if hybrid is None else hybrid.apply(self, drafts, sampled_token_ids)

    def create_speculative_config(self, *args, **kwargs):
        spec = create_spec(self, *args, **kwargs)
        if spec is not None:
            check_our_export(spec.model)
        return spec

    GPUModelRunner.propose_draft_token_ids = propose_draft_token_ids
    EngineArgs.create_speculative_config = create_speculative_config
    GPUModelRunner._eagle_hybrid_installed = True
