"""`python -m specan.cli`."""

from specan.cli import main

main()
