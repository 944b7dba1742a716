"""The hybrid rule inside vLLM 0.32's model runner (one HybridLookup per request, applied after the draft), and
the draft's proposals recorded step by step.

`install()` (called by the plugin's register(), once per process) wraps two methods:
  - GPUModelRunner.propose_draft_token_ids: the draft proposes [num_reqs, K] tokens as always (so its own
    state, KV cache included, stays what vLLM keeps), then each greedy request's context is brought up to
    date (prompt + accepted tokens + this step's sampled tokens: RequestContexts). When EAGLE_RECORD_PROPOSALS
    names a file, the draft's own K tokens of each greedy request are appended to it with their context's key
    (ProposalRecorder, modules/decode/proposals.py; tests/test_export_vllm_serving.py compares them with our
    decoder's), before the hybrid rule touches them. Then, with the export's hybrid field, where the rule matches
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
from modules.decode.proposals import ContextKey, ProposalLog
from modules.export import engines

CONTROL_ENV = "EAGLE_HYBRID_CONTROL"
RECORD_ENV = "EAGLE_RECORD_PROPOSALS"  # a file: every greedy request's draft proposal per step is appended to it
PLACEHOLDER = -1  # vLLM's id for a rejected slot in sampled_token_ids (v1/sample/rejection_sampler.py)


class RequestContexts:
    """Each greedy request's context as the draft proposed after it this step: prompt + accepted tokens + this
    step's sampled tokens, {request id: token list}, one per runner. The hybrid rule matches on it and a recorded
    proposal is keyed by it."""

    def __init__(self):
        self.tokens: dict[str, list[int]] = {}

    def update(self, runner, num_rows, sampled) -> list[tuple[int, str]]:
        """Bring the contexts of the batch's first num_rows requests up to date (requests no longer in the batch are
        forgotten). -> (row, request id) of those the plugin acts on: greedy and past their prefill. sampled: this
        step's tokens, a [num_reqs, K+1] tensor with PLACEHOLDER for rejected slots (vLLM's padded drafter batch,
        the default: not yet in token_ids_cpu) or per-request lists after vLLM's bookkeeping
        (disable_padded_drafter_batch: already there)."""
        import torch

        batch = runner.input_batch
        req_ids = batch.req_ids[:num_rows]
        self.tokens = {r: self.tokens[r] for r in req_ids if r in self.tokens}
        new_rows = sampled.tolist() if torch.is_tensor(sampled) else None
        discard = runner.discard_request_mask.np
        rows = []
        for i, req_id in enumerate(req_ids):
            if req_id is None or discard[i] or req_id not in batch.greedy_reqs:
                continue
            context = self.tokens.setdefault(req_id, [])
            context.extend(batch.token_ids_cpu[i, len(context):int(batch.num_tokens_no_spec[i])].tolist())
            if new_rows is not None:
                context.extend(t for t in new_rows[i] if 0 <= t < batch.vocab_size)
            rows.append((i, req_id))
        return rows


class HybridRequests:
    """The rule's state for the requests of one runner: {request id: HybridLookup}."""

    def __init__(self, min_match: int, corrupt: bool = False):
        self.min_match, self.corrupt = min_match, corrupt
        self.lookups: dict[str, HybridLookup] = {}
        self.steps = self.replaced = 0  # request-steps seen, and those whose draft the lookup replaced

    def apply(self, contexts: RequestContexts, rows, drafts, vocab_size: int) -> None:
        """drafts [num_reqs, K]: the rows of `rows` (RequestContexts.update) whose context matches are overwritten
        in place with the lookup's tokens."""
        import torch

        self.lookups = {r: lookup for r, lookup in self.lookups.items() if r in contexts.tokens}
        for i, req_id in rows:
            lookup = self.lookups.get(req_id)
            if lookup is None:
                lookup = self.lookups[req_id] = HybridLookup(drafts.shape[1], self.min_match)
            context = contexts.tokens[req_id]
            lookup.extend(context[len(lookup.context):])
            self.steps += 1
            tokens = lookup.lookup()
            if tokens is not None:
                if self.corrupt:
                    tokens = [(t + 1) % vocab_size for t in tokens]
                drafts[i] = torch.tensor(tokens, dtype=drafts.dtype, device=drafts.device)
                self.replaced += 1


class ProposalRecorder:
    """Logs the draft's own proposal of every greedy request and step, keyed by its context
    (modules/decode/proposals.py), to the file RECORD_ENV names: {request id: ContextKey} grown with the context."""

    def __init__(self, path):
        self.log = ProposalLog(path)
        self.keys: dict[str, ContextKey] = {}

    def record(self, contexts: RequestContexts, rows, drafts) -> None:
        self.keys = {r: key for r, key in self.keys.items() if r in contexts.tokens}
        if not rows:
            return
        proposed = drafts.tolist()  # one host read for the batch
        lines = []
        for i, req_id in rows:
            context = contexts.tokens[req_id]
            key = self.keys.setdefault(req_id, ContextKey())
            key.extend(context[key.length:])
            lines.append((key.key, key.length, proposed[i]))
        self.log.write(lines)


class AfterDraft:
    """What the plugin does to a runner's drafts, [num_reqs, K], each step: bring the greedy requests' contexts up
    to date, record the draft's own proposals (when RECORD_ENV names a file), then apply the hybrid rule (when the
    export has the hybrid field), in that order: the record is the draft's, never the lookup's."""

    def __init__(self, hybrid: HybridRequests | None = None, recorder: ProposalRecorder | None = None):
        self.hybrid, self.recorder = hybrid, recorder
        self.contexts = RequestContexts()

    def __call__(self, runner, drafts, sampled):
        import torch

        if not torch.is_tensor(drafts):  # the n-gram and custom proposers' lists: not a draft model
            return drafts
        rows = self.contexts.update(runner, drafts.shape[0], sampled)
        if self.recorder is not None:
            self.recorder.record(self.contexts, rows, drafts)
        if self.hybrid is not None:
            self.hybrid.apply(self.contexts, rows, drafts, runner.input_batch.vocab_size)
        return drafts


def after_draft_of(runner) -> AfterDraft | None:
    """The runner's AfterDraft, made on first use from its draft's config.json and RECORD_ENV; None when there is
    nothing to do (no hybrid field, no recording): the drafts then pass untouched, at no cost."""
    if not hasattr(runner, "_eagle_after_draft"):
        spec = getattr(runner, "speculative_config", None)
        min_match = engines.read_hybrid_min_match(draft_config(getattr(spec, "model", None)) or {})
        hybrid = HybridRequests(min_match, os.environ.get(CONTROL_ENV) == "corrupt") if min_match else None
        record = os.environ.get(RECORD_ENV)
        recorder = ProposalRecorder(record) if record else None
        runner._eagle_after_draft = AfterDraft(hybrid, recorder) if hybrid or recorder else None
    return runner._eagle_after_draft


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
        after = after_draft_of(self)
        return drafts if after is None else after(self, drafts, sampled_token_ids)

    def create_speculative_config(self, *args, **kwargs):
        spec = create_spec(self, *args, **kwargs)
        if spec is not None:
            check_our_export(spec.model)
        return spec

    GPUModelRunner.propose_draft_token_ids = propose_draft_token_ids
    EngineArgs.create_speculative_config = create_speculative_config
    GPUModelRunner._eagle_hybrid_installed = True
