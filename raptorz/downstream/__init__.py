"""Downstream: ``embeddings.zarr`` and a labels CSV in, fitted heads and scores out.

Reads the labels (:mod:`.labels`) and the embeddings lazily, in memory or streamed
(:mod:`.features`), fits the paper's linear head or the original's MLP (:mod:`.heads`),
scores with bootstrap intervals and plots (:mod:`.metrics`, :mod:`.pca`), and saves a
model that predicts on new stores (:mod:`.model`). Entry points:
:func:`raptorz.fit` (:mod:`.fitting`) and :func:`raptorz.predict`. The paper's
experiments: the raw-voxel baseline (:mod:`.baselines`), grouped scores of several models
on shared bootstrap resamples (:mod:`.scoring`) and the ablations over K, seeds, planes
and train sizes from stored tokens (:mod:`.sweeps`). Reads embeddings only through
:mod:`raptorz.embedding.embeddings` (the store's reader) and volumes through
:func:`raptorz.stores.open_store`.
"""
