"""mixtrain: faster image-classifier training by input mixing (the MixTrain method).

Public API for use in one's own training loop. With the data resident as one uint8 tensor::

    from mixtrain import MixTrain, adapt, EpochBatches, Normalizer, Augment, separated_loss, sample_stats

With a map-style ``Dataset`` and your own transforms in a ``DataLoader``::

    from mixtrain import Mixer, adapt      # mixer.sampler, mixer.compose(images, labels), mixer.loss(logits, step)

In PyTorch Lightning: ``mixtrain.integrations.lightning.MixTrainCallback``. See the README for a
complete loop of each kind in a few lines.
"""

__version__ = "0.1.0"

from .batches import Batch, EpochBatches
from .compose import Augment, Normalizer, compose, pool_masks
from .data import load_data
from .errors import DivergedError, MixtrainError, MixtrainWarning, OptionError
from .loader import Mixer, MixSampler, MixStep
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
    "DivergedError",
    "EpochBatches",
    "EpochPlan",
    "LossMemory",
    "MixOptions",
    "MixSampler",
    "MixStep",
    "MixTrain",
    "MixUp",
    "Mixer",
    "MixtrainError",
    "MixtrainWarning",
    "Normalizer",
    "OptionError",
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
