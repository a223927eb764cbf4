"""Data: the synthetic shapes world, image loading, and datasets for training and evaluation."""
