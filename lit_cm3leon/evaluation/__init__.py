"""Evaluation library: the paper's metrics (VQA accuracy, COCO captioning, FID), bootstrap
intervals, the `metrics.json` schema and the paper's figures. The scripts in `eval/` are thin
command-line wrappers around the `score_*` functions here.
"""
