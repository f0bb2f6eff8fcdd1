"""What finished models say and how they compare: the shortcut audit and Grad-CAM, ensembles, the
leaderboard, notebook summaries and the HTML report, and predictions for new films (``lungs predict``)."""
