"""Shared code of the EAGLE draft-training scripts.

One idea per file: data formatting and loss mask, storage, target loading,
draft models, trainers, tree decoding, export. Scripts at the top level and in
train/ and benchmark/ stay thin and import from here.
"""
