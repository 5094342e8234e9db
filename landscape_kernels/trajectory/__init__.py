"""Weight trajectories, layer 4: recording, crash-safe stores, sharded stores, streaming PCA.

- ``recorder``: ``TrajectoryRecorder``; ``store``: in-memory and on-disk chunk stores;
- ``sharded``: one store per rank, reopened as one trajectory;
- ``pca``: ``StreamingPCA`` (exact, Gram, Frequent-Directions sketch);
- ``distributed``: PCA of parameter-sharded trajectories in a process group.
"""
from .pca import StreamingPCA
from .recorder import TrajectoryRecorder
from .sharded import open_sharded_trajectory
from .store import CorruptChunkError, open_trajectory

__all__ = ["TrajectoryRecorder", "open_trajectory", "CorruptChunkError", "open_sharded_trajectory", "StreamingPCA"]
