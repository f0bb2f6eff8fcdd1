"""lungs_utils — helpers shared by the lungs notebook suite.

Importing this package has no side effects (no device selection, no downloads, no Kaggle auth).
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import DataWarning, LungsError

CLASS_NAMES: tuple[str, ...] = ("normal", "other disease", "COVID-19")
NUM_CLASSES: int = len(CLASS_NAMES)
COMPETITION: str = "ml-intensive-yandex-academy-spring-2024"

__all__ = ["CLASS_NAMES", "COMPETITION", "NUM_CLASSES", "DataWarning", "LungsError", "__version__"]
