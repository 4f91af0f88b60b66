"""Downstream: ``embeddings.zarr`` and a labels CSV in, fitted heads and scores out.

Reads the labels (:mod:`.labels`) and the embeddings lazily, in memory or streamed
(:mod:`.features`), fits the paper's linear head or the original's MLP (:mod:`.heads`),
scores with bootstrap intervals and plots (:mod:`.metrics`, :mod:`.pca`), and saves a
model that predicts on new stores (:mod:`.model`). Entry points:
:func:`raptorz.fit` (:mod:`.fitting`) and :func:`raptorz.predict`. Reads embeddings only
through :func:`raptorz.embedding.embeddings.open_embeddings`.
"""
