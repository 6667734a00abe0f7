"""Evaluation of 3D segmentation from one prompt: metrics, structure sets, the evaluate runner."""
