"""``python -m buildq`` is the ``buildq`` command."""

from .cli import main

main()
