"""What people touch: the ``lungs`` command, the demo, and the ``96_explore`` widget."""
