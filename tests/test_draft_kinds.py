"""Every registered draft kind (modules/draft/kinds.py) round-trips: build from a target -> one TTT
training step -> lossless tree decoding -> export for the engines -> load, through the registry alone."""
import json

import pytest
import torch
from safetensors.torch import load_file

from modules.draft import kinds as draft_kinds
from modules.draft.loading import draft_kind, load_draft
from modules.decode.parallel import ParallelDecoder
from modules.decode.tree_decoding import EagleDecoder
from modules.training.ttt_trainer import TTTCollator, TTTTrainer, TTTTrainingArguments
from tests._helpers_decode import plain_greedy
from tests._helpers_eagle3 import AUX, VOCAB, tiny_target


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    """A tiny Llama target saved as a model folder (4 layers: the EAGLE-3 aux layers 1, 2, 3 exist)."""
    path = tmp_path_factory.mktemp("target")
    tiny_target(seed=0).save_pretrained(path)
    return str(path)


def conversations(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (16,), generator=g)
        mask = torch.zeros(16, dtype=torch.long)
        mask[4:] = 1
        items.append({"input_ids": ids, "loss_mask": mask, "row_id": i})
    return items


def train_one_step(kind, draft, target, out_dir):
    """One optimizer step of the TTT trainer (features computed by the target: online)."""
    args = TTTTrainingArguments(
        output_dir=str(out_dir), max_steps=1, learning_rate=1e-2, per_device_train_batch_size=4, report_to=[],
        save_strategy="no", use_cpu=True, warmup_steps=0, ttt_steps=2, sim_steps=2, dataloader_num_workers=0,
        seed=0, **kind.loss_weights)
    trainer = TTTTrainer(model=draft, args=args, train_dataset=conversations(), data_collator=TTTCollator(64),
                         target_head=target.lm_head.weight if kind.own_vocab else None, target=target, online=True)
    result = trainer.train()
    return trainer.draft_module(), result.training_loss


def decoder(kind, target, draft):
    """Our decoder for the kind: one draft forward per cycle for parallel kinds, an EAGLE-2 tree otherwise."""
    if kind.parallel:
        return ParallelDecoder(target, draft)
    return EagleDecoder(target, draft, total_tokens=8, depth=3, top_k=2)


@pytest.mark.parametrize("name", list(draft_kinds.KINDS))
def test_kind_round_trips(name, target_dir, tmp_path):
    round_trip(name, target_dir, tmp_path)


def round_trip(name, target_dir, tmp_path):
    """Build -> one TTT step -> lossless decoding -> export -> load -> the same proposals, for the kind `name`."""
    torch.manual_seed(0)
    kind = draft_kinds.get(name)
    target = tiny_target(seed=0)  # the same weights as target_dir

    draft = kind.build(target_dir, draft_ids=torch.arange(0, VOCAB, 2), aux_layers=AUX)
    assert draft_kinds.kind_of(draft) is kind

    before = {k: v.clone() for k, v in draft.named_parameters() if v.requires_grad}
    draft, loss = train_one_step(kind, draft, target, tmp_path / "train")
    assert torch.isfinite(torch.tensor(loss))
    changed = [k for k, v in draft.named_parameters() if v.requires_grad and not torch.equal(v, before[k])]
    assert changed, "one training step left every trained weight unchanged"

    draft.eval()
    prompt = torch.randint(3, VOCAB, (9,), generator=torch.Generator().manual_seed(1))
    decoded = decoder(kind, target, draft).generate(prompt, 16)
    assert decoded.tokens == plain_greedy(target, prompt, 16)  # lossless

    out = kind.export(draft, tmp_path / "export", target=target_dir, dtype=torch.float32)
    assert sorted(p.name for p in out.iterdir()) == sorted(kind.export_files)
    assert draft_kind(out) == name
    if kind.parallel:  # what vLLM's parallel drafting reads (modules/export/engines.py)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["parallel_draft_tokens"] == draft.parallel_tokens
        assert cfg.get("mask_token_id", cfg.get("dflash_config", {}).get("mask_token_id")) == draft.mask_token_id
        mask_hidden = load_file(str(out / "model.safetensors")).get("mask_hidden")
        if "dflash_config" in cfg:  # DFlash: vLLM refuses a mask_hidden tensor
            assert mask_hidden is None and cfg["dflash_config"]["causal"] is False
        else:  # P-EAGLE (and kinds derived from it): the learned mask feature, in the fused feature space
            assert cfg["parallel_drafting"] and mask_hidden.shape == (1, 3 * target.config.hidden_size)

    loaded = load_draft(out, target_model=target_dir).eval()
    assert draft_kinds.kind_of(loaded) is kind
    saved = loaded.state_dict()
    for k in changed:  # the trained weights came back
        torch.testing.assert_close(saved[k], draft.state_dict()[k], rtol=0, atol=0)
    again = decoder(kind, target, loaded).generate(prompt, 16)
    assert again.tokens == decoded.tokens
    assert again.accept_lengths == decoded.accept_lengths  # the same proposals


def test_a_folder_no_kind_reads_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"eagle_version": 7, "architectures": ["SomethingElse"]}')
    with pytest.raises(ValueError, match="0 registered draft kinds read this config"):
        draft_kinds.kind_of_folder(tmp_path)
    with pytest.raises(ValueError, match="unknown draft kind 'medusa'"):
        draft_kinds.get("medusa")
    with pytest.raises(ValueError, match="not a registered draft kind"):
        draft_kinds.kind_of(torch.nn.Linear(2, 2))


def test_a_kinds_own_options_reach_the_training_scripts_flags_without_editing_them(monkeypatch, tmp_path):
    """A kind declares its build options (DraftKind.options, fields made with `setting`): registered, they are flags
    of train/train_eagle_ttt.py with their help and --config entries, and reach build() by name. Control: the
    registry without that kind has no such flag."""
    import dataclasses
    import importlib
    import sys
    import types
    from dataclasses import dataclass

    from modules.draft.eagle3_draft import Eagle3Kind
    from modules.settings import setting, settings_parser
    from train import train_eagle_ttt

    @dataclass
    class ToyOptions:
        toy_width: int = setting(3, "toy: the width of the toy's own thing")

    class ToyKind(Eagle3Kind):
        name = "optioned-toy"
        options = ToyOptions

    module = types.ModuleType("modules.draft.optioned_toy")
    module.KIND = ToyKind()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(draft_kinds.KINDS, ToyKind.name, module.__name__)
    script = importlib.reload(train_eagle_ttt)
    try:
        args = script.parse_args(["--arch", ToyKind.name, "--toy-width", "7"])
        assert args.toy_width == 7 and draft_kinds.kind_options(module.KIND, args) == {"toy_width": 7}
        assert draft_kinds.kind_options(draft_kinds.get("dflash"), args) == {"parallel_tokens": 4, "draft_layers": 2}
        (tmp_path / "run.json").write_text(json.dumps({"arch": ToyKind.name, "toy_width": 5}))
        assert script.parse_args(["--config", str(tmp_path / "run.json")]).toy_width == 5
        assert "--toy-width" in settings_parser(script.Settings).format_help()
    finally:
        monkeypatch.undo()
        script = importlib.reload(train_eagle_ttt)
    assert "toy_width" not in {f.name for f in dataclasses.fields(script.Settings)}
