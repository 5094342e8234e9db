"""Where ``analyse`` keeps each finished stage, so that ``resume`` skips it: the results in
``DIR/stages.json`` (rewritten atomically as each stage finishes) and the stage's arrays in
``DIR/<stage>.npz`` (written to a temporary name and renamed; read without pickle)."""
import os

import numpy as np

from ...training.state_files import read_json, write_json


class StageCache:
    """``get(stage)`` -> (result, arrays) of a stage an earlier run finished, or None; ``put`` keeps one.
    Without a folder nothing is kept (the library call in a notebook); without ``write`` (ranks other
    than 0 under torchrun) the folder is only read."""

    def __init__(self, folder=None, resume=False, write=True):
        self.folder = None if folder is None else os.fspath(folder)
        self.write = write
        self.results = {}
        if self.folder is not None:
            if write:
                os.makedirs(self.folder, exist_ok=True)
            path = self._json()
            if resume and os.path.isfile(path):
                self.results = read_json(path)

    def _json(self):
        return os.path.join(self.folder, "stages.json")

    def _npz(self, stage):
        return os.path.join(self.folder, f"{stage}.npz")

    def get(self, stage):
        if stage not in self.results:
            return None
        result = {k: v for k, v in self.results[stage].items() if k != "_arrays"}  # "_arrays": it has an npz
        arrays = {}
        path = self._npz(stage)
        if os.path.isfile(path):
            try:
                with np.load(path, allow_pickle=False) as f:
                    arrays = {k: f[k] for k in f.files}
            except (OSError, ValueError, EOFError) as exc:
                raise ValueError(f"analyse: {path} is not a readable array file ({exc}); remove it to compute the "
                                 f"stage {stage!r} again") from exc
        elif self.results[stage].get("_arrays"):
            return None  # the arrays never reached the disk: compute the stage again
        return result, arrays

    def put(self, stage, result, arrays):
        if self.folder is None or not self.write:
            return
        if arrays:
            tmp = self._npz(stage) + ".tmp.npz"
            np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
            os.replace(tmp, self._npz(stage))
        self.results[stage] = dict(result, _arrays=bool(arrays))
        write_json(self._json(), self.results)
