"""Target features from a serving engine, for online training: the server (serve_features.py) and its client.

`train/train_eagle_ttt.py --online --engine vllm` takes the features of each batch from ONE engine process
instead of holding the target in every trainer rank (what makes --online fit at 70B: the engine runs the
target with tensor parallelism on its own GPUs, the trainer ranks hold only the draft and the target's
embedding and head). The engine is modules/data/engine_vllm.VllmFeatureEngine, the one the generators'
`--engine vllm` uses: its features are the HF path's (modules/data/features.target_features).

Protocol, over plain HTTP (stdlib http.server / urllib; JSON in, safetensors out, nothing pickled):
    GET  /info      -> JSON {model, hidden_size, num_hidden_layers, vocab_size, aux_layers, max_length, dtype}
    POST /features  JSON {"input_ids": [[id, ...], ...], "aux_layers": [ids] or null}
                    -> safetensors bytes: last.<b> [T_b, H] (the final-norm output) per row b and, when
                       aux_layers were asked (they must be the ones the server captures), aux.<b> [T_b, k*H]
    an error        -> status 400 (a bad request) or 500, JSON {"error": one line}
The engine runs in the server's main thread; requests wait in a queue, and every request waiting when the
engine becomes free goes into one engine batch (the trainer ranks' micro-batches are prefilled together).

The trainer starts the server itself (local rank 0 of each node, the other ranks wait until it answers;
stopped when training ends), or connects to one started by hand (`--engine-url`).
"""
import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from modules.data.generation_cli import FusedGenerateSettings, GenerateSettings
from modules.settings import like, setting

START_TIMEOUT_S = 3600   # loading a 70B target into a tensor-parallel engine takes minutes
REQUEST_TIMEOUT_S = 900  # one batch: the engine may be busy with the other ranks' batches first
# the launcher's variables stay with the trainer: vLLM sets up its own process group from them otherwise
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class FeatureServerError(RuntimeError):
    """The feature server cannot be reached, or serves another model or other layers (one line for users)."""


@dataclass
class FeatureServerSettings:
    """serve_features.py's settings: the generators' target and engine settings, plus where to listen."""
    model: str | None = like(GenerateSettings, "model")
    aux_layers: list[int] | None = like(FusedGenerateSettings, "aux_layers")
    max_length: int = like(GenerateSettings, "max_length", help="longest token list a request may hold")
    target_dtype: str = like(GenerateSettings, "target_dtype")
    gpu_index: list[int] | None = like(GenerateSettings, "gpu_index")
    engine_tensor_parallel: int = like(GenerateSettings, "engine_tensor_parallel")
    engine_pipeline_parallel: int = like(GenerateSettings, "engine_pipeline_parallel")
    engine_gpu_memory: float = like(GenerateSettings, "engine_gpu_memory")
    engine_kv_cache_gib: float = like(GenerateSettings, "engine_kv_cache_gib")
    engine_max_seqs: int = like(GenerateSettings, "engine_max_seqs")
    engine_max_batched_tokens: int = like(GenerateSettings, "engine_max_batched_tokens")
    engine_eager: bool = like(GenerateSettings, "engine_eager")
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0: trainers on other machines may connect)")
    port: int = setting(8765, "port to listen on")
    capture_shift: int = setting(0, "tests only: capture the aux layers shifted by this while reporting the asked "
                                    "ones (a control that must fail the equality checks)", hidden=True)


# ----------------------------------------------------------------------------- server
class _Job:
    """One /features request waiting for the engine."""

    def __init__(self, rows: list[list[int]], want_aux: bool):
        self.rows, self.want_aux = rows, want_aux
        self.done = threading.Event()
        self.result: bytes | None = None
        self.error: str | None = None


def _check_request(body: dict, info: dict) -> tuple[list[list[int]], bool]:
    """(token id lists, aux wanted) of a /features request, or ValueError naming what is wrong."""
    rows, aux = body.get("input_ids"), body.get("aux_layers")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        raise ValueError("input_ids must be a non-empty list of non-empty token id lists")
    for r in rows:
        if len(r) > info["max_length"]:
            raise ValueError(f"a row of {len(r)} tokens is longer than the server's --max-length {info['max_length']}")
        if not all(isinstance(t, int) and 0 <= t < info["vocab_size"] for t in r):
            raise ValueError(f"token ids must be integers in [0, {info['vocab_size']})")
    if aux is not None and list(aux) != info["aux_layers"]:
        raise ValueError(f"this server captures aux layers {info['aux_layers']}, the request asks for {list(aux)}: "
                         f"start it with --aux-layers {' '.join(map(str, aux))}")
    return rows, aux is not None


def _handler(info: dict, jobs: queue.Queue):
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str) -> None:
            self._reply(status, json.dumps({"error": message}).encode(), "application/json")

        def do_GET(self):
            if self.path != "/info":
                return self._error(404, f"unknown path {self.path} (GET /info, POST /features)")
            self._reply(200, json.dumps(info).encode(), "application/json")

        def do_POST(self):
            if self.path != "/features":
                return self._error(404, f"unknown path {self.path} (GET /info, POST /features)")
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                job = _Job(*_check_request(body, info))
            except (ValueError, AttributeError) as err:
                return self._error(400, str(err))
            jobs.put(job)
            job.done.wait()
            if job.error is not None:
                return self._error(500, job.error)
            self._reply(200, job.result, "application/octet-stream")

        def log_message(self, *args):  # one line per request would flood the log
            pass

    return Handler


def _serve_batch(engine, batch: list[_Job], dtype: torch.dtype) -> None:
    """Every waiting request in one engine prefill; each gets its rows' features (or the error)."""
    from safetensors.torch import save

    examples = [(i, ids, [0] * len(ids)) for i, ids in enumerate(ids for job in batch for ids in job.rows)]
    try:
        convs = engine.prefill(examples, dtype)
    except Exception as err:  # the engine's error goes back to every waiting trainer rank
        for job in batch:
            job.error = f"engine: {type(err).__name__}: {err}"
            job.done.set()
        return
    start = 0
    for job in batch:
        tensors = {}
        for b, conv in enumerate(convs[start:start + len(job.rows)]):
            tensors[f"last.{b}"] = conv["hidden_states"].contiguous()
            if job.want_aux:
                tensors[f"aux.{b}"] = conv["aux_hidden_states"].contiguous()
        start += len(job.rows)
        job.result = save(tensors)
        job.done.set()


def serve(settings: FeatureServerSettings) -> None:
    """Load the engine, then answer requests until SIGTERM / SIGINT."""
    from modules.data.engine_vllm import VllmFeatureEngine
    from modules.export.engines import default_aux_layers
    from modules.data.generation_cli import loop_settings, place_process
    from modules.placement import pick_device
    from modules.target import load_target_config, load_tokenizer, model_display_name, pick_dtype

    # the engine reads the generators' settings: these ones, the rest at their defaults (dataset replies)
    names = {f.name for f in dataclasses.fields(GenerateSettings)}
    generator = GenerateSettings(**{k: v for k, v in dataclasses.asdict(settings).items() if k in names})
    place_process(generator)
    info, jobs = {}, queue.Queue()  # info is filled once the engine is loaded; nothing is answered before that
    httpd = ThreadingHTTPServer((settings.host, settings.port), _handler(info, jobs))  # a busy port fails now
    config = load_target_config(settings.model).get_text_config()
    aux = settings.aux_layers or default_aux_layers(config.num_hidden_layers)
    dtype = pick_dtype(settings.target_dtype, pick_device("auto"))
    captured = loop_settings(generator, 0, [i + settings.capture_shift for i in aux])
    engine = VllmFeatureEngine(settings.model, load_tokenizer(settings.model), captured, dtype, generator)
    info.update(model=model_display_name(settings.model), hidden_size=config.hidden_size,
                num_hidden_layers=config.num_hidden_layers, vocab_size=config.vocab_size, aux_layers=aux,
                max_length=settings.max_length, dtype=str(dtype).removeprefix("torch."))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    print(f"feature server ready at http://{settings.host}:{settings.port}: {info}", flush=True)
    try:
        while not stop.is_set():
            try:
                batch = [jobs.get(timeout=0.5)]
            except queue.Empty:
                continue
            while not jobs.empty():
                batch.append(jobs.get_nowait())
            _serve_batch(engine, batch, dtype)
    finally:
        httpd.shutdown()
        while not jobs.empty():
            job = jobs.get_nowait()
            job.error = "the feature server is stopping"
            job.done.set()
        engine.close()


# ----------------------------------------------------------------------------- client
class FeatureClient:
    """The trainer's side: the target features of a batch, computed by the server at `url`."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self._info = None

    def _open(self, path: str, body: bytes | None = None, timeout: float = REQUEST_TIMEOUT_S) -> bytes:
        request = urllib.request.Request(self.url + path, data=body,
                                         headers={"Content-Type": "application/json"} if body else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            try:
                message = json.loads(err.read())["error"]
            except (ValueError, KeyError):
                message = f"HTTP {err.code}"
            raise FeatureServerError(f"feature server {self.url}: {message}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise FeatureServerError(f"no feature server reachable at {self.url} ({reason}): start one with "
                                     f"`python serve_features.py --model MODEL --port PORT` and pass its URL as "
                                     f"--engine-url, or leave --engine-url out to let the trainer start it") from None

    def info(self, timeout: float = 10) -> dict:
        if self._info is None:
            self._info = json.loads(self._open("/info", timeout=timeout))
        return self._info

    def wait_ready(self, process: subprocess.Popen | None = None, log: Path | None = None,
                   timeout: float = START_TIMEOUT_S) -> dict:
        """/info once the server answers; a server `process` that ends first is an error quoting its `log`."""
        deadline = time.time() + timeout
        while True:
            try:
                return self.info(timeout=5)
            except FeatureServerError:
                if process is not None and process.poll() is not None:
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log else ""
                    raise FeatureServerError(f"the feature server exited with code {process.returncode} before it "
                                             f"was ready; the end of {log}:\n{tail}") from None
                if time.time() > deadline:
                    raise
                time.sleep(1)

    def check(self, model_display: str, target_cfg, aux_layers: list[int] | None, max_length: int,
              allow_other_model: bool) -> None:
        """The server serves this target, captures these aux layers and takes rows this long; else an error."""
        info = self.info()
        where = f"the feature server at {self.url}"
        for key in ("hidden_size", "vocab_size"):
            if info[key] != getattr(target_cfg, key):
                raise FeatureServerError(f"{where} serves '{info['model']}' ({key} {info[key]}), the draft trains for "
                                         f"'{model_display}' ({key} {getattr(target_cfg, key)})")
        if info["model"] != model_display and not allow_other_model:
            raise FeatureServerError(f"{where} serves model '{info['model']}', training is for '{model_display}' (pass "
                                     f"--allow-other-model if they are the same weights)")
        if aux_layers is not None and list(aux_layers) != info["aux_layers"]:
            raise FeatureServerError(f"{where} captures aux layers {info['aux_layers']}, the draft needs "
                                     f"{list(aux_layers)}: restart it with --aux-layers "
                                     f"{' '.join(map(str, aux_layers))}, or train with --aux-layers "
                                     f"{' '.join(map(str, info['aux_layers']))}")
        if info["max_length"] < max_length:
            raise FeatureServerError(f"{where} takes rows of up to {info['max_length']} tokens, training cuts them at "
                                     f"{max_length}: restart it with --max-length {max_length}")

    @torch.no_grad()
    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 aux_layers: list[int] | None = None):
        """(last [B,L,H], aux [B,L,k*H] or None) of a right-padded batch, on input_ids' device, as
        modules/data/features.target_features returns them (padded positions are zeros here)."""
        B, L = input_ids.shape
        if attention_mask is None:
            lengths = [L] * B
        else:
            n = attention_mask.sum(1)
            if not torch.equal(attention_mask.bool(), torch.arange(L, device=n.device)[None] < n[:, None]):
                raise ValueError("the feature server needs right-padded batches (attention mask 1...1 0...0)")
            lengths = n.tolist()
        rows = [input_ids[b, :n].tolist() for b, n in enumerate(lengths)]
        from safetensors.torch import load

        body = json.dumps({"input_ids": rows, "aux_layers": None if aux_layers is None else list(aux_layers)})
        data = load(self._open("/features", body.encode()))
        last = self._padded([data[f"last.{b}"] for b in range(B)], L, input_ids.device)
        aux = self._padded([data[f"aux.{b}"] for b in range(B)], L, input_ids.device) if aux_layers else None
        return last, aux

    @staticmethod
    def _padded(parts: list[torch.Tensor], length: int, device) -> torch.Tensor:
        out = parts[0].new_zeros(len(parts), length, parts[0].shape[-1])
        for b, x in enumerate(parts):
            out[b, :len(x)] = x
        return out.to(device)


# ----------------------------------------------------------------------------- the trainer's own server
def start_server(settings: FeatureServerSettings, log: Path) -> subprocess.Popen:
    """serve_features.py with these settings (a --config file next to its log), in its own process group,
    without the launcher's rank variables; its output goes to `log`."""
    from modules.io import atomic_write_text
    from modules.paths import REPO_ROOT

    log.parent.mkdir(parents=True, exist_ok=True)
    config = log.with_suffix(".json")
    atomic_write_text(config, json.dumps(dataclasses.asdict(settings), indent=2))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV and not k.startswith("TORCHELASTIC_")}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, str(REPO_ROOT / "serve_features.py"), "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop_server(process: subprocess.Popen, grace_s: float = 60) -> None:
    """SIGTERM to the server's process group (the server and its engine processes); after the server ended, or
    grace_s later, SIGKILL to whatever of the group is left."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
