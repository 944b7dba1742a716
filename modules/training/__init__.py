"""Stage 2, training: HF Trainer subclasses with a config dataclass each (TRL style).

    eagle_trainer.py  EagleTrainer + EagleTrainingArguments: EAGLE-1/2 on stored features (train/train.py)
    ttt_trainer.py    TTTTrainer + TTTTrainingArguments: training-time test of every kind (train_eagle_ttt.py)
    settings.py       the training settings both scripts share (TrainingSettings, LossSettings, TTTSettings)
    setup.py          what both scripts share: data checks, split, attention choice, TrainingArguments, error ladder
    curves.py         loss / accuracy / simulated-tau curves from a Trainer's log history -> PNG
    optimizers.py     --optimizer muon: Muon on the 2-D hidden weights + AdamW on the rest, one torch Optimizer
    profiling.py      --profile-steps N: torch.profiler over N optimizer steps -> OUTPUT_DIR/profile.txt
"""
