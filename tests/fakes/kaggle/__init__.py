"""A stand-in for the official ``kaggle`` package, for tests/test_docs.py: no network, ever.

Put ``tests/fakes`` first on PYTHONPATH and this package shadows the real one completely (the real one
authenticates on import and talks to kaggle.com). It keeps the real package's shape where lungs_utils
and the docs touch it: ``kaggle.api.kaggle_api_extended.KaggleApi`` (authenticate,
competition_download_files, competition_submit, kernels_push) and the ``kaggle`` command
(``python -m kaggle.cli``; tests/fakes/bin/kaggle) with ``kernels push / status / output``.

"Kaggle" itself is a folder, ``$FAKE_KAGGLE_SERVER`` (see :mod:`kaggle.server`): the competition's data
(a small phantom set, made on first use), every submission and every pushed notebook version.
"""

from kaggle.api.kaggle_api_extended import KaggleApi

__version__ = "0.0.0-fake"

# Like the real package: importing it authenticates (and says so when there are no credentials).
api = KaggleApi()
try:
    api.authenticate()
except (Exception, SystemExit):
    pass
