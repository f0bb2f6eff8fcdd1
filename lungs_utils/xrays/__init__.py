"""The films: the competition's folder layout and labels files, the decoded-image cache, datasets, splits and
folds, film polarity, lung masks as files, input presets (augmentation) and the phantom dataset.

Knows nothing of models or training. Torch is imported only by the modules that build tensors
(``data``, ``presets``, ``masks``), never by importing this package.
"""
