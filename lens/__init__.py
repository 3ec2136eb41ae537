"""lens: a mechanistic-interpretability workbench for in-context retrieval at corpus scale."""

from lens.errors import LensError
from lens.models import load_model

__all__ = ["LensError", "load_model"]
