"""The run log: OUT/cryomag.log for the duration of one command."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("cryomag")


@contextlib.contextmanager
def run_log(out: str | os.PathLike | None) -> Iterator[Path | None]:
    """Create ``out`` and append the "cryomag" logger's INFO records to out/cryomag.log.

    The log starts with the exact command line (``command: ...``) and the cryomag version
    (:mod:`cryomag.runinfo`), which ``cryomag report`` shows.

    Yields ``out`` as a Path (None when ``out`` is None: nothing is created or logged to a
    file). The handler is removed and closed on exit, also after an error.
    """
    if out is None:
        yield None
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "cryomag.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    from cryomag.runinfo import run_record

    rec = run_record()
    log.info("command: %s", rec["command_line"])
    log.info(
        "cryomag %s, Python %s, host %s, user %s, working folder %s",
        rec["cryomag_version"], rec["python"], rec["host"], rec["user"], rec["cwd"],
    )  # fmt: skip
    try:
        yield out
    finally:
        log.removeHandler(handler)
        handler.close()
