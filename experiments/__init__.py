"""Command-line entry points: ``python -m experiments.hopfield|cnn|p2g``."""

import sys

if sys.argv[:1] == ["-m"]:  # started as ``python -m experiments.<cli>`` (argv[0] is "-m" while the package loads)
    import os
    import signal

    def _interrupted_while_starting(signum, frame) -> None:
        """Ctrl-C during the imports, before the CLI's own handler: the same one line, no traceback."""
        os.write(2, b"interrupted\n")
        os._exit(130)

    signal.signal(signal.SIGINT, _interrupted_while_starting)
