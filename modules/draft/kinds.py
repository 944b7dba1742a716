"""The registry of draft architectures: the one place that decides which kind a draft is.

    KINDS = {"eagle2": "modules.draft.eagle_draft", "eagle3": "modules.draft.eagle3_draft"}

Each entry names the module that defines the draft model and, as `KIND`, its `DraftKind`. A kind knows
  - how to build a fresh draft for a target:         build(target, **options)
  - how to train it (the TTT trainer's hooks):       draft.ttt_step(...), fused_features, own_vocab, loss_weights,
                                                     anchored (one block per anchor: sample anchors)
  - which scripts make its data and train it:        data_script, train_command(ttt_steps)
  - how to decode with it (modules/decode/tree_decoding.py): tree_adapter(draft, vocab_ids=None); parallel
  - how vLLM serves it:                              vllm_method, vllm_speculative_config(folder, k)
  - how to save a run's draft and export it for the engines (modules/export/engines.py rules):
                                                     save_trained(...), export(...), export_files,
                                                     export_tensors(config) (what an export must hold)
  - how to load a saved folder:                      load(folder, target, dtype, attn_implementation)
and recognises its own drafts: instances of `draft_class`, folders whose config.json `owns_config` accepts.
Adding a kind is one file (draft model + its DraftKind) and one line in KINDS (docs/extending.md). Nothing
outside modules/draft/ compares kind names (tests/test_registry_used.py): it asks the kind.
Kinds are imported on first use, so importing this module costs nothing.
"""
import importlib
import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from modules.settings import setting

KINDS = {"eagle2": "modules.draft.eagle_draft", "eagle3": "modules.draft.eagle3_draft",
         "peagle": "modules.draft.peagle_draft", "dflash": "modules.draft.dflash_draft"}  # name -> module of KIND


class DraftKind:
    """What the scripts, the trainer, the decoder and the exporter need to know about one architecture."""

    name = None
    draft_class = None
    fused_features = False  # training's step-0 input: fused aux-layer features, not the last hidden state
    own_vocab = False       # the draft's head covers its own draft vocabulary (ids mapped by to_target_ids)
    loss_weights = {}       # TTT defaults of w_reg (feature loss), w_cls (cross-entropy) and noise_std
    export_files = ()       # what export() writes
    parallel = False        # proposes a block of tokens in one forward (P-EAGLE): modules/decode/parallel.py
    vllm_method = None      # vLLM 0.32's speculative_config "method" for this kind; None = vLLM does not serve it
    train_script = "train/train_eagle_ttt.py"  # the trainer of this kind: the TTT trainer trains every kind
    anchored = False        # trains one block per anchor slot in one pass (DFlash): the trainer calls the draft's
                            # block_unroll instead of unrolling ttt_step, and samples --block-anchors anchors
    options = None          # a dataclass of this kind's own build options (fields made with `setting`): they
                            # become flags of train/train_eagle_ttt.py, --help and --config entries, and reach
                            # build() by name (kind_options); None = none

    @property
    def data_script(self) -> str:
        """The generator that writes this kind's training data (fused aux-layer features or the last hidden state)."""
        return "generate_data_fused_features.py" if self.fused_features else "generate_data.py"

    def train_command(self, ttt_steps: int) -> list[str]:
        """The training script and the flags that pick this kind (run from the repo root; the caller adds --data,
        --output-dir, ...): `train_script --arch NAME`, so a subclass trains itself, never its parent."""
        return [self.train_script, "--arch", self.name, "--ttt-steps", str(ttt_steps)]

    def unroll_steps(self, draft, requested: int) -> int:
        """Draft steps the TTT trainer unrolls and simulates: `requested` (--ttt-steps / --sim-steps) for a
        sequential draft; a parallel kind trains and proposes exactly its block size."""
        return requested

    def vllm_speculative_config(self, folder, num_tokens: int) -> dict:
        """vLLM's `speculative_config` serving an export of this kind with `num_tokens` draft tokens per cycle."""
        if self.vllm_method is None:
            raise ValueError(f"vLLM 0.32 serves no {self.name} draft")
        return {"method": self.vllm_method, "model": str(folder), "num_speculative_tokens": int(num_tokens)}

    def owns_config(self, config: dict) -> bool:
        """True when a saved draft's config.json looks like one of this kind (its architecture name, a marker
        it writes). Overlaps with other kinds are settled by kind_of_config, not here."""
        raise NotImplementedError

    def build(self, target, **options):
        """A fresh draft for `target` (name/path/module). Options a kind does not use are ignored, so a
        script passes what it knows: bias, attn_implementation, draft_ids, aux_layers, weights=(embed, head)."""
        raise NotImplementedError

    def load(self, folder, target=None, dtype=torch.float32, attn_implementation="sdpa"):
        return self.draft_class.from_pretrained(folder, target=target, dtype=dtype,
                                                attn_implementation=attn_implementation)

    def tree_adapter(self, draft, vocab_ids=None):
        """The draft in the tree decoder's protocol (modules/decode/tree_decoding.DraftAdapter)."""
        raise NotImplementedError

    def save_trained(self, draft, out_dir, target):
        """A training run's final draft, in the layout our scripts (bench_eagle.py, export.py) reload."""
        raise NotImplementedError

    def export(self, draft, out_dir, target=None, dtype=torch.bfloat16):
        """Engine layouts (SGLang / vLLM / official EAGLE) of a draft or a checkpoint folder; returns the folder."""
        raise NotImplementedError

    def export_tensors(self, config: dict) -> dict[str, tuple[int, ...]]:
        """{name: shape} of every tensor an export of this kind with this config.json holds: the draft built
        from the config on the meta device (no memory), in its serving layout (modules/draft/export_check.py)."""
        with torch.device("meta"):
            draft = self.draft_class(self.draft_class.config_from_dict(config))
        return {k: tuple(v.shape) for k, v in draft.serving_tensors(with_embed=True).items()}


@dataclass
class ParallelOptions:
    """The build option every parallel kind (P-EAGLE, DFlash) declares: its block size."""
    parallel_tokens: int = setting(4, "parallel kinds (peagle, dflash): tokens proposed per draft forward (the block "
                                      "size K, saved in the draft's config); they unroll K steps, not --ttt-steps")


def option_settings() -> tuple:
    """The option dataclasses of every registered kind (each once), the bases a training script's Settings adds
    so that a kind's own options are its flags, --help and --config entries without editing generic settings."""
    found = list(dict.fromkeys(kind.options for kind in all_kinds() if kind.options is not None))
    # a kind's options that another kind's extend come in through the derived class (one consistent MRO)
    return tuple(cls for cls in found if not any(other is not cls and issubclass(other, cls) for other in found))


def kind_options(kind: DraftKind, settings) -> dict:
    """{option: value} of `kind`'s own options, read from a script's settings: what build() receives."""
    return {f.name: getattr(settings, f.name) for f in fields(kind.options)} if kind.options is not None else {}


def get(name: str) -> DraftKind:
    if name not in KINDS:
        raise ValueError(f"unknown draft kind '{name}' (registered: {', '.join(KINDS)})")
    return importlib.import_module(KINDS[name]).KIND


def all_kinds() -> list[DraftKind]:
    return [get(name) for name in KINDS]


def kind_of(draft) -> DraftKind:
    """The kind of a draft model (an instance of some kind's draft_class; the most derived class wins:
    a P-EAGLE draft is also an EAGLE-3 draft)."""
    owners = [kind for kind in all_kinds() if isinstance(draft, kind.draft_class)]
    if owners:
        return max(owners, key=lambda kind: len(kind.draft_class.__mro__))
    raise ValueError(f"{type(draft).__name__} is not a registered draft kind ({', '.join(KINDS)})")


FALLBACK = "eagle2"  # the kind of a config no other kind claims: official EAGLE-1/2 checkpoints carry no marker


def kind_of_config(config: dict) -> DraftKind:
    """The one place that decides which kind a config.json describes. Each kind's owns_config says only
    whether the config looks like its own; overlaps are settled here, so a new kind edits no sibling:
      - a kind derived from another wins over it (a P-EAGLE config is also an EAGLE-3 one);
      - FALLBACK (EAGLE-1/2) counts only when no other kind claims the config."""
    claims = [kind for kind in all_kinds() if kind.owns_config(config)]
    owners = [kind for kind in claims if kind.name != FALLBACK] or claims
    owners = [kind for kind in owners
              if not any(other is not kind and isinstance(other, type(kind)) for other in owners)]
    if len(owners) != 1:
        raise ValueError(f"{len(owners)} registered draft kinds read this config "
                         f"({', '.join(k.name for k in owners) or 'none of ' + ', '.join(KINDS)}); exactly one must")
    return owners[0]


def kind_of_folder(folder) -> DraftKind:
    """The kind of a saved draft, from its config.json (kind_of_config)."""
    cfg_file = Path(folder) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: no draft config (is {folder} a draft folder?)")
    try:
        return kind_of_config(json.loads(cfg_file.read_text()))
    except ValueError as err:
        raise ValueError(f"{cfg_file}: {err}") from None
