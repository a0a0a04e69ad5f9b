"""``python -m cryomag``: the command line (:mod:`cryomag.cli.main`)."""

from cryomag.cli.main import main

main()
