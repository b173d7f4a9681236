"""Run `python -m mach_lightning.fit` with a SIGKILL at a chosen point (a test helper).

    python tests/kill_driver.py step:16 -- key=value ...     killed after batch step 16's hooks
    python tests/kill_driver.py epoch_end:0 -- key=value ... killed after epoch 0's end hooks
    python tests/kill_driver.py term:16 -- key=value ...     SIGTERM after batch step 16's hooks

`term` sends SIGTERM after LastCheckpoint looked for one at that batch: the window where a real
signal lands between its check and Lightning's, which a run must survive as well as any other.

The killer is a `Checkpoint` callback appended last, so Lightning runs it after LastCheckpoint
and ModelCheckpoint at the same hook: the process dies right after a checkpoint was saved there,
as a job killed by the OOM killer or a node failure would. Under DDP every rank kills itself at
the same point.
"""

from __future__ import annotations

import os
import signal
import sys

from lightning.pytorch.callbacks import Checkpoint

from mach_lightning import fit, training


class KillAt(Checkpoint):
    def __init__(self, spec: str):
        self.where, at = spec.split(":")
        self.at = int(at)

    def on_train_batch_end(self, trainer, module, *args):
        if self.where == "step" and module.batch_step == self.at:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.where == "term" and module.batch_step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_epoch_end(self, trainer, module):
        if self.where == "epoch_end" and trainer.current_epoch == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    spec, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: kill_driver.py WHERE:AT -- fit arguments"
    build = training.build_callbacks
    training.build_callbacks = lambda *a: build(*a) + [KillAt(spec)]
    return fit.main(args)


if __name__ == "__main__":
    sys.exit(main())
