"""A progress bar on the launcher's side of a Flower simulation, read from the run folder the ServerApp writes.

The ServerApp runs in Flower's simulation process, so its own bars never reach the terminal of ``fedmerge simulate``;
what does reach the launcher is the run folder, where the server saves ``clients/<domain>.safetensors`` as each
one-shot reply is accepted, ``models/<method>.safetensors`` once the merges are built (before they are evaluated) and
``results.json`` at the end. The bar has one step per training domain plus two: the merged models are saved, and
the results are written. Its phase is ``local training`` until every client's weights are in, then ``merging``,
then ``evaluation`` (with the FedAvg rounds, which save nothing before the end).
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm.auto import tqdm

from fedmerge.runners.results import RESULTS_FILE
from fedmerge.scenario import Scenario

# File times come from the kernel's coarse clock, which may lag time.time() by a few milliseconds: a merge written
# just after the bar was created must still count (an earlier run's files are older than this by far).
MTIME_SLACK_S = 1.0


class FolderProgress:
    """A tqdm bar on stderr that :meth:`poll` advances from the files in ``run_dir``.

    A merged model's file, and ``results.json``, count only if written after the bar was created (a ``--resume``
    folder holds the earlier run's until the run keeps them aside); a client's weights count whenever written
    (``--resume`` re-uses them: its local training is done).
    A client whose reply failed the format checks has no weights saved (one the norm test refuses is saved on arrival,
    its card marked rejected): the bar then waits at ``local training`` until the merges appear.
    """

    def __init__(self, cfg: Scenario, run_dir: Path, enabled: bool) -> None:
        from fedmerge.recommender import model_path
        from fedmerge.storage import client_weights_path

        self.client_files = [client_weights_path(run_dir, d) for d in cfg.data.training_domains()]
        self.merge_files = [model_path(run_dir, method) for method in cfg.merge.methods]
        self.results = run_dir / RESULTS_FILE
        self.since = time.time() - MTIME_SLACK_S
        self.phase = "local training"
        self.bar = tqdm(total=len(self.client_files) + 2, desc=self.phase, unit="step", disable=not enabled)

    def poll(self) -> bool:
        """Advance the bar to what the folder shows; True once this run wrote ``results.json`` (the run's end)."""
        clients = sum(path.is_file() for path in self.client_files)
        merged = any(self._written_since(path) for path in self.merge_files)
        done = self._written_since(self.results)
        if done:
            phase, steps = "done", self.bar.total
        elif merged:
            phase, steps = "evaluation", clients + 1
        else:
            phase, steps = "merging" if clients == len(self.client_files) else "local training", clients
        if phase != self.phase or steps != self.bar.n:
            self.phase = phase
            self.bar.set_description_str(phase, refresh=False)
            self.bar.update(steps - self.bar.n)
        return done

    def _written_since(self, path: Path) -> bool:
        try:
            return path.stat().st_mtime >= self.since
        except FileNotFoundError:
            return False

    def close(self) -> None:
        """Close the bar (its last state stays on the terminal)."""
        self.bar.close()
