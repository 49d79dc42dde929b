"""``python -m automtl``: the same command line as ``automtl``."""
from .cli import main

main(prog_name="automtl")
