"""A newcomer's kind takes 2 files with docs/extending.md as the only guide: this test adds the page's toy
parallel kind exactly as written there (its file's code block as module modules.draft.toy_draft, its KINDS
line executed as is), then runs it through everything a registered kind goes through."""
import re
import sys
import types

import pytest
import torch

from modules.draft import kinds as draft_kinds
from modules.paths import REPO_ROOT
from tests.test_draft_kinds import round_trip, target_dir  # noqa: F401 (fixture)

PAGE = REPO_ROOT / "docs" / "extending.md"


def walkthrough_files() -> tuple[str, str]:
    """(source of modules/draft/toy_draft.py, the KINDS line): the two code blocks of the page's walkthrough."""
    text = PAGE.read_text()
    section = text[text.index("### Walkthrough: a third parallel kind in 2 files"):]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert "`modules/draft/toy_draft.py`" in section.split("```")[0]  # the page names the files it writes
    return blocks[0], blocks[1]


@pytest.fixture
def toy_kind(monkeypatch):
    """The page's 2 files: the module, importable under the name the KINDS line gives, and that line run."""
    source, kinds_line = walkthrough_files()
    module = types.ModuleType("modules.draft.toy_draft")
    exec(compile(source, "modules/draft/toy_draft.py", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "modules.draft.toy_draft", module)
    kinds_copy = dict(draft_kinds.KINDS)
    exec(kinds_line, {"KINDS": kinds_copy})  # file 2: the one line, as the page writes it
    for name, where in kinds_copy.items():
        monkeypatch.setitem(draft_kinds.KINDS, name, where)
    return draft_kinds.get("toy")


def test_the_page_has_two_files():
    source, kinds_line = walkthrough_files()
    assert "class ToyKind(" in source and "KIND = ToyKind()" in source
    assert kinds_line.strip() == 'KINDS["toy"] = "modules.draft.toy_draft"'


def test_toy_kind_is_a_parallel_kind_the_scripts_train(toy_kind):
    import demo
    from train import train_eagle_ttt

    assert toy_kind.parallel and not toy_kind.anchored and toy_kind.fused_features
    assert toy_kind.train_command(4) == ["train/train_eagle_ttt.py", "--arch", "toy", "--ttt-steps", "4"]
    assert toy_kind.data_script == "generate_data_fused_features.py"
    assert train_eagle_ttt.parse_args(["--arch", "toy"]).arch == "toy"
    assert "--arch toy" in " ".join(demo.stage_commands(demo.parse_args(["--arch", "toy"]))["train"])
    with pytest.raises(ValueError, match="vLLM 0.32 serves no toy draft"):
        toy_kind.vllm_speculative_config("folder", 4)


def test_toy_config_is_the_toys(toy_kind):
    """kinds.kind_of_config settles the overlap: the toy's config also looks like P-EAGLE's and EAGLE-3's."""
    config = {"eagle_version": 3, "parallel_drafting": True, "toy_parallel": True, "architectures": ["X"]}
    assert draft_kinds.kind_of_config(config) is toy_kind
    assert draft_kinds.kind_of_config({**config, "toy_parallel": False}).name == "peagle"


def test_toy_kind_round_trips(toy_kind, target_dir, tmp_path):  # noqa: F811 (the fixture)
    from modules.decode.parallel import ParallelDecoder, make_decoder
    from tests._helpers_eagle3 import AUX, VOCAB, tiny_target

    round_trip("toy", target_dir, tmp_path)
    draft = toy_kind.build(tiny_target(seed=0), draft_ids=torch.arange(0, VOCAB, 2), aux_layers=AUX)
    assert type(draft).__name__ == "ToyDraft" and draft_kinds.kind_of(draft) is toy_kind
    assert isinstance(make_decoder(tiny_target(seed=0), draft.eval()), ParallelDecoder)
