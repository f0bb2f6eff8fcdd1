"""The Kaggle competition: the official API round trip (download, submit) and self-contained Kaggle
notebooks (``lungs kaggle-kernel``)."""
