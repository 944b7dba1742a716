"""Train a draft of any registered kind with training-time test (TTT), the pair of train/train.py: eagle3 (fused
features + draft vocabulary, the default), peagle, dflash, or eagle2 (the EAGLE-1/2 draft with the TTT loss).

    python train/train_eagle_ttt.py                      # embedded SmolLM2 on data_out/eagle3
    python train/train_eagle_ttt.py --online --end 2000  # no stored features: the target runs in the loop
    python train/train_eagle_ttt.py --online --engine vllm   # the features from one vLLM engine process
    python train/train_eagle_ttt.py --arch eagle2 --data data_out/eagle2
    torchrun --nproc_per_node 8 train/train_eagle_ttt.py ...

Offline data comes from generate_data_fused_features.py (EAGLE-3) or generate_data.py (eagle2
arch). With --online, conversations are read from --dataset, tokenised with the same loss mask, and
the target computes the features of each batch (modules/data/features.target_features) on the fly.
With --engine vllm the ranks hold no target: one engine process computes the features (serve_features.py,
modules/data/feature_server.py), started here (local rank 0 of each node) or already running (--engine-url).
The draft vocabulary is counted from the training conversations' trained tokens before training.
Checkpoints: OUTPUT_DIR/checkpoint-*; final draft: OUTPUT_DIR/draft (SGLang EAGLE-3 layout, or
the EAGLE layouts of train/export.py for --arch eagle2); run_config.json (every setting), summary.json,
log_history.json (per-step losses/accuracies) and training_curves.png describe the run.
"""
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from modules.draft import kinds as draft_kinds
from modules.paths import DEFAULT_FUSED_DATA_DIR, DEFAULT_TTT_TRAIN_DIR
from modules.data.feature_server import FeatureServerSettings
from modules.data.generation_cli import FusedGenerateSettings, GenerateSettings
from modules.settings import like, parse_settings, save_run_config, setting
from modules.training.settings import TrainingSettings, TTTSettings, with_kind_defaults
from modules.training.setup import UsageError, check_data_fits_target, exit_code, pick_attention, resume_checkpoint
from modules.training.setup import split
from modules.training.setup import run_and_finish_distributed, training_arguments

ONLINE = "online training (features computed by the target inside the loop)"  # a --help section


# ----------------------------------------------------------------------------- SETTINGS
# Edit a default here or pass the flag (--arch eagle2). The settings shared with train.py (--lr,
# --max-steps, --grad-accum, ...) are TrainingSettings in modules/training/settings.py, and the TTT ones
# (--ttt-steps, --ttt-decay, --topk-distill, --topk-distill-weight) TTTSettings there (the trainer's
# arguments inherit them); --w-reg, --w-cls and --noise-std default to the draft kind's loss weights. Each draft
# kind's own build options (--parallel-tokens, --draft-layers, --eagle31-norms) are its DraftKind.options, declared
# in its file (modules/draft/*_draft.py) and added here as bases: a new kind's options need no edit of this file.
@dataclass
class Settings(TrainingSettings, TTTSettings, *draft_kinds.option_settings()):
    arch: str = setting("eagle3", "eagle3 | eagle2 (EAGLE-1/2 draft with the TTT loss) | peagle (P-EAGLE: EAGLE-3 "
                                  "proposing --parallel-tokens tokens in one forward) | dflash (DFlash block drafter)",
                        choices=draft_kinds.KINDS)
    data: list[str] = setting([str(DEFAULT_FUSED_DATA_DIR)], "offline data folders (ignored with --online)")
    output_dir: str = setting(str(DEFAULT_TTT_TRAIN_DIR), "checkpoints, the exported draft and the run's json files",
                              hf="output_dir")
    draft_vocab_size: int | None = setting(None, "N most frequent trained tokens (eagle3); None = smallest N "
                                                 "covering --draft-vocab-coverage of the trained tokens")
    draft_vocab_coverage: float = setting(0.95, "share of the trained tokens the draft vocabulary covers (used "
                                                "when no size is given)")
    online: bool = setting(False, "no stored features: the target runs in the loop", group=ONLINE)
    # the generators' settings (modules/data/generation_cli.py), reused: same flags, defaults and help
    dataset: str = like(GenerateSettings, "dataset", group=ONLINE)
    start: int = like(GenerateSettings, "start", group=ONLINE)
    end: int = like(GenerateSettings, "end", default=2000, group=ONLINE)
    aux_layers: list[int] | None = like(FusedGenerateSettings, "aux_layers", nargs=3, group=ONLINE)
    target_dtype: str = like(GenerateSettings, "target_dtype", aliases=(), group=ONLINE)
    system_prompt: str | None = like(GenerateSettings, "system_prompt", group=ONLINE)
    regenerate: bool = like(FusedGenerateSettings, "regenerate", group=ONLINE)
    temperature: float = like(GenerateSettings, "temperature", group=ONLINE)
    max_new_tokens: int = like(GenerateSettings, "max_new_tokens", group=ONLINE)
    # --engine vllm: the features from one engine process (serve_features.py), the generators' engine settings
    engine: str = like(GenerateSettings, "engine", group=ONLINE,
                       help="who computes the online features: hf (the target in every rank) or vllm (one vLLM engine "
                            "process per node, or the one at --engine-url; dataset replies only)")
    engine_url: str | None = setting(None, "--engine vllm: the running feature server to use (python "
                                           "serve_features.py ...), e.g. http://HOST:8765; None = start one",
                                     group=ONLINE)
    engine_port: int = like(FeatureServerSettings, "port", group=ONLINE,
                            help="--engine vllm without --engine-url: port of the feature server started here")
    engine_gpu_index: list[int] | None = like(GenerateSettings, "gpu_index", aliases=(), group=ONLINE,
                                              help="--engine vllm without --engine-url: the visible GPUs the "
                                                   "engine started here may use (not the trainer ranks' GPUs)")
    engine_tensor_parallel: int = like(GenerateSettings, "engine_tensor_parallel", group=ONLINE)
    engine_pipeline_parallel: int = like(GenerateSettings, "engine_pipeline_parallel", group=ONLINE)
    engine_gpu_memory: float = like(GenerateSettings, "engine_gpu_memory", group=ONLINE)
    engine_kv_cache_gib: float = like(GenerateSettings, "engine_kv_cache_gib", group=ONLINE)
    engine_max_seqs: int = like(GenerateSettings, "engine_max_seqs", group=ONLINE)
    engine_max_batched_tokens: int = like(GenerateSettings, "engine_max_batched_tokens", group=ONLINE)
    engine_eager: bool = like(GenerateSettings, "engine_eager", group=ONLINE)
# ----------------------------------------------------------------------------- end of SETTINGS


def parse_args(argv=None) -> Settings:
    args = parse_settings(Settings, argv, description=__doc__.splitlines()[0])
    return with_kind_defaults(args, draft_kinds.get(args.arch))


class ListDataset:
    """Tokenised conversations for online training: {"input_ids", "loss_mask", "row_id"}."""

    def __init__(self, examples):
        import torch
        self.items = [{"input_ids": torch.tensor(ids), "loss_mask": torch.tensor(mask), "row_id": r}
                      for r, ids, mask in examples]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def online_data(args):
    """(dataset of token ids + loss masks, target model or None) for --online. The target is whole on this
    rank's device (cuda:LOCAL_RANK under torchrun, modules/placement.py), where the trainer puts the draft;
    with --engine vllm no rank loads it (only its tokenizer here)."""
    from modules.data.chat import load_rows
    from modules.data.generation import encode_rows
    from modules.placement import process_ranks
    from modules.target import load_target, load_tokenizer

    if args.engine == "hf":
        target, tokenizer = load_target(args.model, dtype=args.target_dtype)
    elif args.regenerate:
        raise UsageError(f"--engine {args.engine} feeds --online training with the dataset's replies only: drop "
                         f"--regenerate, or make self-distilled data offline (generate_data_fused_features.py "
                         f"--engine {args.engine} --replies greedy) and train on it")
    else:
        target, tokenizer = None, load_tokenizer(args.model)
    rows = load_rows(args.dataset, args.start, args.end)
    if args.regenerate:  # each rank regenerates its share into its own file, then reads all of them
        from modules.data.regenerate import LocalGenerator, regenerate_sharded
        rank, world = process_ranks()
        gen = LocalGenerator(target, tokenizer, args.temperature, args.max_new_tokens, args.max_length, args.seed)
        rows = regenerate_sharded(rows, gen, args.output_dir, f"regenerated-{args.start}-{args.end}", rank, world,
                                  args.system_prompt, progress=rank == 0)
    examples, skipped, _ = encode_rows(tokenizer, rows, args.max_length, args.system_prompt)
    if not examples:
        raise UsageError(f"no usable conversations in rows {args.start}-{args.end} of {args.dataset} ({dict(skipped)})")
    print(f"online: {len(examples)} conversations tokenised, skipped {dict(skipped)}", flush=True)
    return ListDataset(examples), target


def draft_vocab_ids(args, train_ds, vocab_size):
    """Target ids of the draft vocabulary, counted over the training conversations' trained tokens
    (the held-out ones are not counted)."""
    from modules.draft.vocab import count_tokens, select_draft_vocab

    ds, rows = train_ds.dataset, train_ds.indices
    if args.online:
        pairs = ((ds.items[i]["input_ids"], ds.items[i]["loss_mask"]) for i in rows)
    else:
        pairs = ds.token_pairs(rows)
    try:
        counts = count_tokens(pairs, vocab_size)
        ids, covered = select_draft_vocab(counts, size=args.draft_vocab_size, coverage=args.draft_vocab_coverage)
    except ValueError as err:  # a size out of range, no trained tokens, unreadable shards
        raise UsageError(f"draft vocabulary: {err}") from None
    print(f"draft vocab: {len(ids):,} of {vocab_size:,} target tokens cover {covered:.2%} of "
          f"{int(counts.sum()):,} trained tokens", flush=True)
    return ids, covered


def engine_features(args, kind, cfg, display, aux_layers, cleanup):
    """--engine vllm: the client of the feature server at --engine-url, or of one started here (by local rank 0
    of each node: the others wait until it answers; `cleanup` stops it when training ends), checked against
    this target, aux layers and max length."""
    from dataclasses import asdict, fields

    from modules.data.feature_server import FeatureClient, FeatureServerError, start_server, stop_server

    client = FeatureClient(args.engine_url or f"http://127.0.0.1:{args.engine_port}")
    if args.engine_url is not None:
        client.info()  # reachable now, or a clear error
    else:
        process = log = None
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            try:
                client.info(timeout=2)
            except FeatureServerError:
                pass
            else:
                raise UsageError(f"a feature server already answers at {client.url}: pass --engine-url "
                                 f"{client.url} to use it, or another --engine-port")
            shared = {f.name: v for f, v in zip(fields(args), asdict(args).values())
                      if f.name in {g.name for g in fields(FeatureServerSettings)}}
            settings = FeatureServerSettings(**{**shared, "aux_layers": aux_layers, "port": args.engine_port,
                                                "gpu_index": args.engine_gpu_index})
            log = Path(args.output_dir) / f"feature_server-{os.uname().nodename}.log"
            process = start_server(settings, log)
            cleanup.callback(stop_server, process)
            print(f"feature server starting on {client.url} (log: {log})", flush=True)
        client.wait_ready(process, log)
    client.check(display, cfg, aux_layers if kind.fused_features else None, args.max_length, args.allow_other_model)
    return client


def load_data(args, kind, cfg, display, cleanup):
    """(dataset, aux layers, online target or None): offline shards, or with --online the tokenised
    conversations and the target that computes their features (--engine vllm: the feature server's client)."""
    from modules.export.engines import default_aux_layers
    from modules.data.storage import EagleDataset

    if args.engine != "hf" and not args.online:
        raise UsageError(f"--engine {args.engine} feeds --online training; offline data comes from the generators' "
                         f"own --engine {args.engine}")
    if args.engine_url is not None and args.engine == "hf":
        raise UsageError("--engine-url needs --engine vllm")
    if args.online:
        ds, target = online_data(args)
        aux_layers = args.aux_layers or default_aux_layers(cfg.num_hidden_layers)
        if target is None:
            target = engine_features(args, kind, cfg, display, aux_layers, cleanup)
        return ds, aux_layers, target
    ds = EagleDataset(args.data, read_aux=kind.fused_features)
    check_data_fits_target(ds, cfg, display, args.allow_other_model, args.max_length, args.aux_layers)
    if kind.fused_features and not ds.has_aux:
        raise UsageError(f"{ds.folders[0] / 'manifest.json'}: no fused features (aux_layers is null): "
                         f"generate with generate_data_fused_features.py, or train with --online")
    return ds, ds.aux_layers, None


def build_trainer(args, kind, cfg, display, ds, aux_layers, target):
    """(TTTTrainer with a fresh draft, draft vocabulary coverage): the draft takes the target's
    embedding and head; an EAGLE-3 draft also its own vocabulary, counted over the training data."""
    from transformers import set_seed

    from modules.placement import output_device, same_device
    from modules.target_weights import load_embed_and_head
    from modules.training.ttt_trainer import TTTCollator, TTTTrainer, TTTTrainingArguments

    train_ds, eval_ds = split(ds, args.eval_fraction, args.seed, args.train_conversations)
    embed, head = load_embed_and_head(args.model)
    ids, covered = draft_vocab_ids(args, train_ds, cfg.vocab_size) if kind.own_vocab else (None, 1.0)
    set_seed(args.seed)  # the same initial draft for the same seed (as train/train.py)
    draft = kind.build(cfg, weights=(embed, head), draft_ids=ids, aux_layers=aux_layers, bias=args.bias,
                       **draft_kinds.kind_options(kind, args))
    draft.config.target_model = display
    draft.config._attn_implementation = pick_attention(args.attn)
    trainer = TTTTrainer(model=draft, args=training_arguments(args, eval_ds is not None, cls=TTTTrainingArguments),
                         train_dataset=train_ds, eval_dataset=eval_ds,
                         data_collator=TTTCollator(max_length=args.max_length),
                         # a draft vocabulary trains against the target's head
                         target_head=head if kind.own_vocab else None,
                         target=target, online=args.online)
    if args.engine == "hf" and target is not None and not same_device(output_device(target), trainer.args.device):
        raise UsageError(f"the online target is on {output_device(target)} but the draft trains on "
                         f"{trainer.args.device}")
    return trainer, covered


def save_outputs(args, kind, trainer, draft, result, metrics, covered, t0):
    """Rank 0: the draft export (unless --no-export), summary.json, log_history.json, training_curves.png.
    draft: the whole trained draft (trainer.full_draft(): under --fsdp consolidated from the shards)."""
    from modules.training.curves import save_run_outputs

    out = Path(args.output_dir) / "draft"
    if not args.no_export:
        kind.save_trained(draft, out, target=args.model)
    unrolled = kind.unroll_steps(draft, args.ttt_steps)  # a parallel kind: its block size
    summary = {"arch": args.arch, "ttt_steps": unrolled, "online": args.online,
               "engine": args.engine if args.online else None, "steps": result.global_step,
               "train_loss": round(result.training_loss, 5), "draft_vocab_coverage": round(covered, 4),
               "train_runtime_s": round(time.time() - t0, 1), **{k: round(v, 4) for k, v in metrics.items()},
               "draft": None if args.no_export else str(out)}
    save_run_outputs(args.output_dir, trainer.state.log_history, summary,
                     title=f"{args.arch} + TTT ({unrolled} steps): loss, step-0 accuracy, simulated tau")


def main(argv=None):
    args = parse_args(argv)
    with contextlib.ExitStack() as cleanup:  # --engine vllm: stops the feature server this process started
        return run(args, cleanup)


def run(args, cleanup):
    from modules.data.feature_server import FeatureServerError
    from modules.target import model_display_name
    from modules.target_weights import target_config

    t0 = time.time()
    kind = draft_kinds.get(args.arch)
    display = model_display_name(args.model)
    try:
        cfg = target_config(args.model)
        ds, aux_layers, target = load_data(args, kind, cfg, display, cleanup)
        trainer, covered = build_trainer(args, kind, cfg, display, ds, aux_layers, target)
        if trainer.is_world_process_zero():
            save_run_config(args, args.output_dir)
            unrolled = kind.unroll_steps(trainer.draft_module(), args.ttt_steps)  # a parallel kind: its block size
            print(f"{args.arch} + TTT ({unrolled} steps): {len(trainer.train_dataset)} train / "
                  f"{len(trainer.eval_dataset) if trainer.eval_dataset else 0} eval conversations, "
                  f"{'online' if args.online else 'offline'} features; trainable params "
                  f"{sum(p.numel() for p in trainer.model.parameters() if p.requires_grad):,}", flush=True)
        result = trainer.train(resume_from_checkpoint=resume_checkpoint(args.resume, args.output_dir))
    except Exception as err:  # the scripts' one error ladder (modules/training/setup.py)
        code = exit_code(err, args)
        if code is None:
            raise
        return code

    try:
        metrics, eval_error = trainer.evaluate() if trainer.eval_dataset is not None else {}, None
    except FeatureServerError as err:  # the engine went away after training: the trained draft is still saved
        metrics, eval_error = {}, err
    draft = trainer.full_draft()  # every rank: under --fsdp the weights are gathered from all of them
    if trainer.is_world_process_zero():
        save_outputs(args, kind, trainer, draft, result, metrics, covered, t0)
    if eval_error is not None:
        saved = "its checkpoints" if args.no_export else f"the draft ({Path(args.output_dir) / 'draft'})"
        print(f"error: evaluation failed after training ({eval_error}); {saved} and summary.json were saved "
              f"without eval metrics", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run_and_finish_distributed(main))
