"""Weight trajectories, layer 4: recording, crash-safe stores, sharded stores, streaming PCA.

- ``recorder``: ``TrajectoryRecorder``; ``store``: in-memory and on-disk chunk stores;
- ``sharded``: one store per rank, reopened as one trajectory;
- ``pca``: ``StreamingPCA`` (exact, Gram, Frequent-Directions sketch);
- ``distributed``: PCA of parameter-sharded trajectories in a process group.
"""
from .pca import StreamingPCA  # noqa: F401
from .recorder import TrajectoryRecorder  # noqa: F401
from .sharded import open_sharded_trajectory  # noqa: F401
from .store import CorruptChunkError, open_trajectory  # noqa: F401
