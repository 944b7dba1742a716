"""Write speculators' `datasets` folder (input_ids, loss_mask, seq_len) from the hs_{i}.safetensors files that
speculators_format.write_peer_hidden_states() wrote. Runs in .venv-speculators (its `datasets` version then reads
the folder back); standard library, torch, safetensors and datasets only.

    .venv-speculators/bin/python benchmark/peers/speculators_dataset.py --hidden-states HS_DIR --output DATASET_DIR
"""
import argparse
import json
import sys
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden-states", required=True, help="folder of hs_{i}.safetensors (+ rows.json)")
    ap.add_argument("--output", required=True, help="the datasets folder to write (speculators' --data-path)")
    args = ap.parse_args(argv)

    from datasets import Dataset
    from safetensors import safe_open

    hs = Path(args.hidden_states)
    index = hs / "rows.json"
    if not index.is_file():
        print(f"error: {index} missing: write the hidden states first", file=sys.stderr)
        return 2
    n = len(json.loads(index.read_text())["rows"])
    cols = {"input_ids": [], "loss_mask": [], "seq_len": []}
    for i in range(n):
        with safe_open(str(hs / f"hs_{i}.safetensors"), framework="pt") as f:
            ids, mask = f.get_tensor("token_ids"), f.get_tensor("loss_mask")
        cols["input_ids"].append(ids.tolist())
        cols["loss_mask"].append(mask.tolist())
        cols["seq_len"].append(int(ids.numel()))
    ds = Dataset.from_dict(cols)
    ds.set_format(type="torch")
    ds.save_to_disk(args.output)
    print(f"wrote {n} conversations ({sum(cols['seq_len']):,} tokens) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
