"""Settings of the training scripts (TRL style: a dataclass per script, on the mechanism of
modules/settings.py: each field is a flag, its --help text, a run_config.json entry and a --config key).

The settings both training scripts share are `TrainingSettings` below; a script's dataclass subclasses
it and adds its own. `hf=` names the TrainingArguments field that receives a setting unchanged:

    @dataclass
    class Settings(TrainingSettings):
        ttt_steps: int = setting(7, "unrolled draft steps (official EAGLE-3: 7)", hf="ttt_steps")

    args = parse_settings(Settings, argv)      # args.ttt_steps, args.lr, ...; `--ttt-steps 3` on the command line
"""
import dataclasses
from dataclasses import dataclass

from modules.data.generation import GenerationSettings
from modules.data.generation_cli import GenerateSettings
from modules.settings import like, setting


def with_kind_defaults(settings, kind):
    """The settings with w_reg / w_cls / noise_std left at None taken from the draft kind's loss_weights
    (modules/draft/kinds.py decides them: EAGLE-1/2 1.0 / 0.1 / 0.2, EAGLE-3 0 / 1 / 0)."""
    return dataclasses.replace(settings, **{k: v for k, v in kind.loss_weights.items() if getattr(settings, k) is None})


def hf_arguments(settings) -> dict:
    """{TrainingArguments field: value} of the settings passed on unchanged (those with `hf=`)."""
    return {f.metadata["hf"]: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.metadata.get("hf")}


# ----------------------------------------------------------------------------- shared settings
# Settings of both training scripts (train/train.py, train/train_eagle_ttt.py). A script that needs
# another default re-declares the field in its own dataclass. A new setting of a trainer (one its
# TrainingArguments reads) goes into LossSettings / TTTSettings, or takes `hf=` here.

@dataclass
class LossSettings:
    """The loss weights, the learning-rate schedule and the step profiler: settings of both training scripts
    (TrainingSettings inherits them) AND fields of the trainers' TrainingArguments (EagleTrainingArguments
    inherits them, modules/training/eagle_trainer.py): declared once, here. w_reg / w_cls / noise_std left at
    None are the draft kind's (the trainer, or with_kind_defaults, fills them in)."""
    lr_schedule: str = setting("linear", "decay after warmup, from LR to LR * MIN_LR_RATIO: linear (ours) or cosine "
                                         "(SpecForge)", hf="lr_schedule", choices=["linear", "cosine"])
    min_lr_ratio: float = setting(0.1, "the learning rate at the last step, as a share of LR", hf="min_lr_ratio")
    sim_steps: int = setting(5, "chain length of the simulated acceptance length", hf="sim_steps")
    w_reg: float | None = setting(None, "SmoothL1 feature loss weight; None = the draft kind's (EAGLE-1/2: 1.0, "
                                        "EAGLE-3: 0)", hf="w_reg")
    w_cls: float | None = setting(None, "soft cross-entropy weight; None = the draft kind's (EAGLE-1/2: 0.1, "
                                        "EAGLE-3: 1)", hf="w_cls")
    noise_std: float | None = setting(None, "uniform noise on input features; None = the draft kind's (EAGLE-1/2: "
                                            "0.2, EAGLE-3: 0)", hf="noise_std")
    optimizer: str = setting("adamw", "adamw | muon: Muon on the draft's 2-D hidden weights, AdamW on the rest "
                                      "(speculators' default; modules/training/optimizers.py)", hf="optimizer",
                             choices=["adamw", "muon"])
    profile_steps: int = setting(0, "profile this many optimizer steps (after 2 warm-up steps) with torch.profiler "
                                    "and write OUTPUT_DIR/profile.txt, the ops that took the time; 0 = off",
                                 hf="profile_steps")


@dataclass
class TTTSettings:
    """The training-time-test settings: of train/train_eagle_ttt.py and fields of TTTTrainingArguments
    (modules/training/ttt_trainer.py), which reads them: declared once, here."""
    ttt_steps: int = setting(7, "unrolled draft steps (official EAGLE-3: 7)", hf="ttt_steps")
    ttt_decay: float = setting(0.8, "step k's loss weight: TTT_DECAY ** k", hf="ttt_decay")
    topk_distill: int = setting(0, "HASS top-K distillation: add -sum of p_target * log p_draft over the target's "
                                   "K most likely tokens (HASS: K=10); 0 = off", hf="topk_distill")
    topk_distill_weight: float = setting(1.0, "weight of the top-K term", hf="topk_distill_weight")
    freeze_head: bool = setting(False, "keep the draft's lm_head at the target's rows (speculators, ModelOpt, DFlash "
                                       "do): fewer trained weights; off = trained from those rows (our default)",
                                hf="freeze_head", action="store_true")
    train_all_tokens: bool = setting(False, "score every token against the target, the prompt's too (ModelOpt's "
                                            "answer_only_loss false); off = only loss-masked (reply) tokens",
                                     hf="train_all_tokens", action="store_true")
    tv_weight: float = setting(0.0, "weight of a total-variation term 0.5 * sum |p_target - p_draft| per scored "
                                    "token (1 - TV is the acceptance rate of sampled drafting; DSpark: 0.9 with "
                                    "--w-cls 0.1); 0 = off", hf="tv_weight")
    block_anchors: int = setting(64, "block drafters (dflash), which train one block per anchor slot: anchors sampled "
                                     "per conversation and training step (seeded by --seed and the step); 0 = all. "
                                     "Evaluation always scores every anchor", hf="block_anchors")


@dataclass
class TrainingSettings(LossSettings):
    model: str | None = like(GenerateSettings, "model")  # the generators' (modules/data/generation_cli.py)
    epochs: float = setting(4, "passes over the training conversations", hf="num_train_epochs")
    max_steps: int = setting(-1, "optimizer steps; > 0 overrides --epochs", hf="max_steps")
    lr: float = setting(3e-4, "peak learning rate; small data: higher than the official 3e-5 (which used 68k "
                              "conversations)", hf="learning_rate")
    warmup: float = setting(0.05, "warmup steps (>= 1) or fraction of all steps (< 1)", hf="warmup_steps")
    batch_size: int = setting(1, "conversations per device and micro-batch (padded on the right)",
                              hf="per_device_train_batch_size")
    grad_accum: int = setting(4, "micro-batches per optimizer step", hf="gradient_accumulation_steps")
    max_length: int = like(GenerationSettings, "max_length")  # the data's (setup.check_data_fits_target compares)
    eval_fraction: float = setting(0.02, "conversations held out for eval (top-k accuracy, simulated tau)")
    train_conversations: int = setting(0, "train on only the first N conversations of the seeded split (the eval "
                                          "ones stay the same; benchmark/bench_learning_curve.py); 0 = all")
    bias: bool = setting(False, "fc bias of the EAGLE-1/2 draft: vLLM 0.32 builds fc without one (drops it), so "
                                "none by default (modules/export/engines.py)")
    grad_clip: float = setting(0.5, "max gradient norm", hf="max_grad_norm")
    fsdp: bool = setting(False, "shard the draft's weights, gradients and Adam state over the ranks (FSDP2 through "
                                "the HF Trainer; torchrun on CUDA GPUs); checkpoints and the export stay whole "
                                "(docs/gpu.md: when it pays)", action="store_true")
    precision: str = setting("auto", "auto: bf16 autocast on CUDA and on CPUs with bf16 units (~1.8x faster), "
                                     "else fp32", choices=["auto", "bf16", "fp32"])
    attn: str = setting("auto", "auto (flash_attention_2 on CUDA when installed, else sdpa) | sdpa | eager | "
                                "flash_attention_2; TTT attention: eager = the reference ([heads, T, T] scores per "
                                "step), anything else = SDPA kernels, no T x T matrix (modules/draft/ttt_attention.py)")
    logging_steps: int = setting(10, "optimizer steps between log lines", hf="logging_steps")
    save_steps: int = setting(200, "optimizer steps between checkpoints", hf="save_steps")
    save_total_limit: int = setting(2, "checkpoints kept (older ones deleted); 0 = keep all")
    eval_steps: int | None = setting(None, "optimizer steps between evals; None = at the end of every epoch",
                                     hf="eval_steps")
    dataloader_workers: int | None = setting(None, "processes reading the shards per rank; None = 2 on GPU, 0 on "
                                                   "CPU (cores compute)")
    prefetch_factor: int = setting(2, "batches each worker prepares ahead (with workers > 0)")
    report_to: str = setting("none", "none | tensorboard | wandb", hf="report_to")
    seed: int = setting(0, "seed of the split, the initial draft and the data order", hf="seed")
    resume: str | None = setting(None, "checkpoint folder, or 'auto' = the last one in --output-dir")
    allow_other_model: bool = setting(False, "train even if the data manifest names another target model",
                                      action="store_true")
    no_export: bool = setting(False, "skip the export at the end", action="store_true")
