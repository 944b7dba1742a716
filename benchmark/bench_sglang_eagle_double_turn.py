"""Client of an SGLang server running EAGLE: both MT-bench turns (the second after the server's
own first answer), as EAGLE's evaluation does. Same flags as bench_sglang_eagle_single_turn.py
(server command there and in docs/gpu.md); acceptance length = completion_tokens / spec_verify_ct.

    python benchmark/bench_sglang_eagle_double_turn.py --port 30000
"""

from dataclasses import dataclass

from benchmark.bench_sglang_eagle_single_turn import Settings as SingleTurn
from benchmark.bench_sglang_eagle_single_turn import main
from modules.settings import like


# ---- SETTINGS (the rest are the single-turn script's) ---------------------------------------
TURNS = 2
OUT = "benchmark/results/sglang_double_turn.json"


@dataclass
class Settings(SingleTurn):
    turns: int = like(SingleTurn, "turns", default=TURNS)
    out: str = like(SingleTurn, "out", default=OUT)
# -------------------------------------------------------------------------------------------

if __name__ == "__main__":
    main(settings=Settings)
