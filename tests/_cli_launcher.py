"""Runs the command line from this source tree as a process: ``python tests/_cli_launcher.py ARGS``.

An installed package has the CLI at topthetaexport.cli (pyproject maps cli/ there); a source checkout has it
at cli/, so this puts the checkout first on sys.path and calls the same ``main()`` the entry point calls.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli.main import main

sys.exit(main())
