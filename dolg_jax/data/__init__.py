"""Datasets (TFDS builders writing ArrayRecord, read without TensorFlow) and grain input pipelines.

Modules are imported explicitly (`from dolg_jax.data import gldv2, grain_pipeline`) so that
importing one does not pull in the others. Importing `dolg_jax.data.gldv2` registers the TFDS
builder `gldv2`.
"""
