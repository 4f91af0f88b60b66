"""Embedding: ``volumes.zarr`` in, ``embeddings.zarr`` out (``raptorz embed``).

Every slice of each volume, along the chosen planes, is prepared (:mod:`.preprocessing`)
and encoded by a frozen 2D foundation model (:mod:`.encoders`); the tokens are
mean-pooled over slices and compressed by seeded random projections (:mod:`.projection`)
in a plain torch kernel (:mod:`.kernel`). :mod:`.runner` maps the kernel over a Dask
cluster and writes the labelled, resumable store (:mod:`.embeddings`, whose
:func:`~raptorz.embedding.embeddings.open_embeddings` is how the downstream stage reads
it). Entry point: :func:`raptorz.embed`. Never imports the ingest stage: it reads the
volumes store through :mod:`raptorz.stores`.
"""
