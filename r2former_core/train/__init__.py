"""Training: datasets (synthetic worlds, VG benchmark, MSLS), mining, losses, the trainer (1 process or
torchrun DDP), validation, checkpointing of the training state, curves. CLI: `r2former train`.

    from r2former_core.train.datasets import open_dataset
    from r2former_core.train.trainer import TrainConfig, Trainer
"""
