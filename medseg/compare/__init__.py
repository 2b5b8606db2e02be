"""Same-protocol comparison of models: ``medseg compare BUNDLE... --iterations N`` or
``from medseg.compare import compare``. See :mod:`medseg.compare.runner` for the report's layout."""

from medseg.compare.runner import compare

__all__ = ["compare"]
