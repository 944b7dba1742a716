"""Stage 2, training: HF Trainer subclasses with a config dataclass each (TRL style).

    eagle_trainer.py  EagleTrainer + EagleTrainingArguments: EAGLE-1/2 on stored features (train/train.py)
    ttt_trainer.py    TTTTrainer + TTTTrainingArguments: training-time test of every kind (train_eagle_ttt.py)
    settings.py       the training settings both scripts share (TrainingSettings, LossSettings, TTTSettings)
    setup.py          what both scripts share: data checks, split, attention choice, TrainingArguments, error ladder
    curves.py         loss / accuracy / simulated-tau curves from a Trainer's log history -> PNG
"""
