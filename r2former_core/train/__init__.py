"""Training: settings and stages as data (`config`), datasets (synthetic worlds, VG benchmark, MSLS),
mining rules, batch sources, losses and loss terms, the stages in code (`stages`), the trainer (1
process or torchrun DDP), validation, checkpointing of the training state, curves.
CLI: `r2former train`.

    from r2former_core.train.config import TrainConfig
    from r2former_core.train.datasets import open_dataset
    from r2former_core.train.trainer import Trainer
"""
