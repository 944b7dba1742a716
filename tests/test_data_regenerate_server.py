"""The OpenAI-compatible client path of regeneration against a REAL server on this CPU:
llama-cpp-python's server serving the embedded SmolLM2 GGUF (not a mock).

llama-cpp-python builds from source: the 0.3.36 wheel took 71 min here (2 shared cores at load ~12,
built at nice 19), so it is not part of the default test install; this test runs where it is
installed: `pip install llama-cpp-python==0.3.36` and, --no-deps, the server extras fastapi==0.115.12
starlette==0.46.2 uvicorn==0.54.0 sse-starlette==3.7.0 starlette-context==0.5.1
pydantic-settings==2.16.3 python-dotenv==1.2.4
(newer fastapi also needs opentelemetry). Measured run: 2.5 s (server start + 3 short replies)."""
import importlib.util
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from modules.paths import embedded_gguf
from modules.data.regenerate import OpenAIGenerator, regenerate_rows

if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("uvicorn") is None:
    pytest.skip("needs llama-cpp-python[server] (built from source, not in the default test install)",
                allow_module_level=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_gguf()), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "1024", "--n_threads", "2", "--chat_format", "chatml"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(url + "/models", timeout=2) as r:
                    json.loads(r.read())
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"llama_cpp.server exited with {proc.returncode}")
                time.sleep(0.5)
        else:
            pytest.fail("llama_cpp.server did not answer within 120 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_regenerate_through_openai_compatible_server(server):
    gen = OpenAIGenerator(server, temperature=0.8, max_new_tokens=8, concurrency=2)
    rows = [(0, {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "x"}]}),
            (1, {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "x"},
                              {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "x"}]})]
    out = dict(regenerate_rows(rows, gen, batch_size=2, progress=False))
    replies = [m["content"] for r in out.values() for m in r["messages"] if m["role"] == "assistant"]
    assert len(replies) == 3 and all(r and r != "x" for r in replies)

