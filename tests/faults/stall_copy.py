"""``python -m tests.faults.stall_copy MARKER RUN_DIR DEST``: ``finetune-flow export-run RUN_DIR DEST``, except that
after it has copied two files into its temporary folder the process writes that folder's path to ``MARKER`` and
sleeps: a test can then kill it in the middle of the copy.

``shutil.copy2`` (what ``tasks.stages.portable`` copies each file with) is patched before the command runs."""
import os
import shutil
import sys
import time
from pathlib import Path


def main() -> int:
    marker, argv = Path(sys.argv[1]), sys.argv[2:]
    real_copy2, copied = shutil.copy2, []

    def stalling_copy2(src, dst, **kwargs):
        result = real_copy2(src, dst, **kwargs)
        copied.append(dst)
        if len(copied) == 2:
            tmp = next(p for p in Path(dst).parents if p.name.startswith(f".{Path(argv[1]).name}.tmp-"))
            marker.with_name(marker.name + ".part").write_text(str(tmp))
            os.replace(marker.with_name(marker.name + ".part"), marker)
            while True:
                time.sleep(60)
        return result

    shutil.copy2 = stalling_copy2
    from flows.cli import main as cli_main

    return cli_main(["export-run", *argv])


if __name__ == "__main__":
    sys.exit(main())
