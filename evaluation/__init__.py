"""Scoring a classifier on labeled images (metrics.py): Kaggle's log loss, accuracy, the confusion matrix,
per-class precision and recall, the most confidently wrong images, and which images training held out.
evaluate_main.py is its command line."""
