"""An export holds exactly the tensors its kind and config need (modules/draft/export_check.py), for every kind;
train/export.py refuses one that does not, after writing it. Controls: a dropped, a reshaped and an extra tensor."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from modules.draft import kinds as draft_kinds
from modules.draft.export_check import IncompleteExportError, check_export
from tests._helpers_eagle import REPO_ROOT, tiny_target

AUX = [1, 2, 3]


def exported(kind_name, tmp_path):
    """A random draft of this kind for a tiny Llama target, exported: the folder."""
    torch.manual_seed(1)
    target = tiny_target("llama", num_hidden_layers=4)
    kind = draft_kinds.get(kind_name)
    draft = kind.build(target, draft_ids=torch.arange(0, 300, 2), aux_layers=AUX, parallel_tokens=3)
    return kind.export(draft, tmp_path / kind_name, target=target)


def rewrite(folder, change):
    sd = load_file(str(folder / "model.safetensors"))
    change(sd)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("kind_name", list(draft_kinds.KINDS))
def test_every_kind_exports_complete_and_a_broken_export_is_refused(kind_name, tmp_path):
    folder = exported(kind_name, tmp_path)
    assert check_export(folder).name == kind_name
    names = sorted(load_file(str(folder / "model.safetensors")))
    want = draft_kinds.get(kind_name).export_tensors(json.loads((folder / "config.json").read_text()))
    assert sorted(want) == names  # the expected set is the export's, not a subset
    dropped = "fc.weight"
    rewrite(folder, lambda sd: sd.pop(dropped))
    with pytest.raises(IncompleteExportError, match=f"incomplete {kind_name} export, refused: missing {dropped}$"):
        check_export(folder)

    folder = exported(kind_name, tmp_path)
    last = names[-1]
    rewrite(folder, lambda sd: sd.__setitem__(last, sd[last].reshape(-1)[:-1].contiguous()))
    with pytest.raises(IncompleteExportError, match=f"{last} has shape"):
        check_export(folder)

    folder = exported(kind_name, tmp_path)
    rewrite(folder, lambda sd: sd.__setitem__("midlayer.extra.weight", torch.zeros(2)))
    with pytest.raises(IncompleteExportError, match="unexpected midlayer.extra.weight"):
        check_export(folder)


def test_export_cli_refuses_an_incomplete_export_it_wrote(tmp_path, monkeypatch, capsys):
    """train/export.py checks what it wrote: an exporter that loses a weight is caught (exit 2, one line)."""
    import importlib.util

    from tests._helpers_eagle3 import tiny_eagle3, tiny_target as tiny_llama

    target = tiny_llama()
    target.save_pretrained(tmp_path / "t")
    tiny_eagle3(target).save_pretrained(tmp_path / "ckpt")
    spec = importlib.util.spec_from_file_location("export_cli", REPO_ROOT / "train" / "export.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--model", str(tmp_path / "t")]
    assert cli.main(argv) == 0  # the intact exporter passes its own check

    kind = draft_kinds.get("eagle3")
    real_export = type(kind).export

    def lossy_export(self, *a, **kw):
        out = real_export(self, *a, **kw)
        rewrite(out, lambda sd: sd.pop("midlayer.mlp.down_proj.weight"))
        return out

    monkeypatch.setattr(type(kind), "export", lossy_export)
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "incomplete eagle3 export, refused: missing midlayer.mlp.down_proj.weight" in err
    assert str(tmp_path) not in err  # the folder's name, no machine path
