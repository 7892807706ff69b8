"""mixtrain: faster image-classifier training by input mixing (the MixTrain method).

Public API for use in one's own training loop::

    from mixtrain import MixTrain, adapt, EpochBatches, Normalizer, Augment, separated_loss, sample_stats

See the README for a complete loop in a few lines.
"""

__version__ = "0.1.0"

from .batches import Batch, EpochBatches
from .compose import Augment, Normalizer, compose, pool_masks
from .data import load_data
from .errors import MixtrainError
from .loss import sample_stats, separated_loss, soft_label_loss
from .memory import LossMemory
from .models import SpatialModel, adapt, create_model, region_pool
from .plan import EpochPlan
from .strategies import Baseline, CutMix, MixOptions, MixTrain, MixUp, Strategy, choose_mixed, create_strategy
from .trainer import TrainConfig, Trainer, train

__all__ = [
    "Augment",
    "Baseline",
    "Batch",
    "CutMix",
    "EpochBatches",
    "EpochPlan",
    "LossMemory",
    "MixOptions",
    "MixTrain",
    "MixUp",
    "MixtrainError",
    "Normalizer",
    "SpatialModel",
    "Strategy",
    "TrainConfig",
    "Trainer",
    "adapt",
    "choose_mixed",
    "compose",
    "create_model",
    "create_strategy",
    "load_data",
    "pool_masks",
    "region_pool",
    "sample_stats",
    "separated_loss",
    "soft_label_loss",
    "train",
]
