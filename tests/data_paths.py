"""Where the tests find the shared real data files (read-only; see ../shared/data/README.md)."""

from pathlib import Path

#: The repository's root.
REPO = Path(__file__).resolve().parents[1]
#: Real cryo-EM files written by RELION, cryoSPARC and the EMDB: ../shared/data.
DATA = REPO.parent / "shared" / "data"
