"""Runs the triplet resume test's config and kills itself with SIGKILL when step N's batch is due.

    python tests/scripts/triplet_killed.py INDOOR_ROOT WORKDIR N

SIGKILL, not an exception: no ``finally``, no checkpoint flush, no cleanup runs, as when a job is
killed by a scheduler or the machine goes down. Used by tests/test_triplet.py.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_triplet import resume_config  # noqa: E402

from jaxvpr.train.triplet import TripletTrainer  # noqa: E402


def main(root: str, workdir: str, kill_at: int) -> None:
    real_batches = TripletTrainer.batches

    def dying_batches(self, epoch, start, current_state):
        for n, item in enumerate(real_batches(self, epoch, start, current_state)):
            if sum(self.steps_per_epoch(e) for e in range(epoch)) + start + n == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            yield item

    TripletTrainer.batches = dying_batches
    TripletTrainer(resume_config(root), workdir).fit()
    sys.exit("the run ended before it was killed")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
