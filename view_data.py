"""Show one stored conversation: trained text in green, untrained text in red, plus its counts.

    python view_data.py --data data_out/eagle2 --index 0
    python view_data.py --data data_out/eagle2 --index 0 --html conv0.html
"""
import html
import sys
from dataclasses import dataclass

from modules.paths import DEFAULT_DATA_DIR
from modules.settings import parse_settings, setting


# ----------------------------------------------------------------------------- SETTINGS
# Edit a default here or pass the flag (--index 3); --config FILE reads them from a JSON/YAML file.
@dataclass
class Settings:
    data: str = setting(str(DEFAULT_DATA_DIR), "data folder (or a parent of part-* folders)")
    index: int = setting(0, "conversation index in the data (0-based)")
    model: str | None = setting(None, "tokenizer to decode with (None: the manifest's model)")
    html: str | None = setting(None, "also write the view as an HTML page")
# ----------------------------------------------------------------------------- end of SETTINGS

GREEN, RED, RESET = "\033[32m", "\033[31m", "\033[0m"


def mask_runs(tokenizer, input_ids, loss_mask) -> list[tuple[str, bool]]:
    """[(text, trained)] for maximal runs of equally masked tokens (decoded together, so multi-byte
    characters split over tokens come out whole)."""
    runs, start = [], 0
    ids, mask = input_ids.tolist(), loss_mask.tolist()
    for t in range(1, len(ids) + 1):
        if t == len(ids) or mask[t] != mask[start]:
            runs.append((tokenizer.decode(ids[start:t]), bool(mask[start])))
            start = t
    return runs


def to_terminal(runs) -> str:
    return "".join(f"{GREEN if trained else RED}{text}{RESET}" for text, trained in runs)


def to_html(runs, title: str, counts: str) -> str:
    spans = "".join(f'<span class="{"t" if trained else "u"}">{html.escape(text)}</span>' for text, trained in runs)
    return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:monospace;white-space:pre-wrap}.t{color:#0a0;}.u{color:#c00;}</style>"
            f"<h3>{html.escape(title)}</h3><p>{html.escape(counts)}</p><div>{spans}</div>\n")


def main(argv=None) -> int:
    args = parse_settings(Settings, argv, description=__doc__.splitlines()[0])

    from modules.data.storage import DataFormatError, EagleDataset
    from modules.target import TargetLoadError, load_tokenizer

    try:
        ds = EagleDataset(args.data)
        if not -len(ds) <= args.index < len(ds):
            raise DataFormatError(f"--index {args.index} out of range: {args.data} holds {len(ds)} conversations")
        item = ds[args.index]
        tokenizer = load_tokenizer(args.model or ds.model_name)
    except (DataFormatError, TargetLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs = mask_runs(tokenizer, item["input_ids"], item["loss_mask"])
    hs = item["hidden_states"]
    counts = (f"conversation {args.index} (dataset row {item['row_id']}): tokens {len(item['input_ids'])}, "
              f"trained {int(item['loss_mask'].sum())}, "
              f"hidden_states {tuple(hs.shape)} {str(hs.dtype).replace('torch.', '')}")
    if "aux_hidden_states" in item:
        counts += f", aux_hidden_states {tuple(item['aux_hidden_states'].shape)}"
    print(to_terminal(runs))
    print(f"\n{counts}   ({GREEN}trained{RESET} / {RED}not trained{RESET})")
    if args.html:
        from modules.io import atomic_write_text
        from pathlib import Path

        atomic_write_text(Path(args.html), to_html(runs, f"{args.data} #{args.index}", counts))
        print(f"wrote {args.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
