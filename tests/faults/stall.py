"""``python -m tests.faults.stall STAGE MARKER [flows.finetune arguments]``: the finetune CLI, except that once
stage ``STAGE`` (its folder is ``<output.dir>/stages/STAGE/<key>``) has written everything into its temporary
folder, and before that folder is published, the process writes the temporary folder's path to ``MARKER`` and
sleeps: a test can then kill it at exactly that point.

``tasks.common.files.atomic_dir`` is patched before ``flows.finetune`` (and so the stages, which import it by name) is
imported."""
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import tasks.common.files


def main() -> int:
    stage, marker = sys.argv[1], Path(sys.argv[2])
    real_atomic_dir = tasks.common.files.atomic_dir

    @contextmanager
    def stalling_atomic_dir(final):
        with real_atomic_dir(final) as tmp:
            yield tmp
            if Path(final).parent.name == stage:
                marker.with_name(marker.name + ".part").write_text(str(tmp))
                os.replace(marker.with_name(marker.name + ".part"), marker)
                while True:
                    time.sleep(60)

    tasks.common.files.atomic_dir = stalling_atomic_dir
    from flows.finetune import main as finetune_main

    return finetune_main(sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
