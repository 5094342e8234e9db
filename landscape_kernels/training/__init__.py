"""Training, layer 5: the SGD engine and what runs inside it, and the papers' data and networks.

- ``trainer``: ``SGDTrainer`` (seeded shuffles, checkpoints, bit-for-bit resume), stopping rules;
- ``callbacks``: ``WindowRecorder``, ``EpochStates``; ``sharpness``: ``SharpnessTracker``;
- ``optim``: ``NSGD``; ``progress``: progress bars, or log lines when stderr is not a terminal;
- ``data``: MNIST, the embedded digits, subsets; ``models``: the papers' networks, a GPT-style model.
"""
from .optim import NSGD
from .sharpness import SharpnessTracker
from .trainer import SGDTrainer

__all__ = ["SGDTrainer", "SharpnessTracker", "NSGD"]
