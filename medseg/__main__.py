"""``python -m medseg ...``: the same command line as ``medseg`` (what torchrun starts on each rank)."""

from medseg.cli import app

if __name__ == "__main__":
    app(prog_name="medseg")
