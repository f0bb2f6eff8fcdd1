"""How good and how sure: macro-F1 and the other metrics, bootstrap intervals and paired comparisons,
calibration, decision offsets, and the figures that show them (``plots``)."""
