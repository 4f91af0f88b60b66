"""Ingest: sources in, ``volumes.zarr`` out (``raptorz convert``).

Reads NIfTI, NRRD, MetaImage, MGH, Analyze, MINC, AFNI, PAR/REC, UK Biobank zips,
MedMNIST npz and DICOM series (:mod:`.sources`, :mod:`.readers`) and the images of BIDS
datasets, with their labels (:mod:`.bids`), orients them to RAS, scales intensities
to [0, 1] with a recorded preset (:mod:`.intensity`), fixes their shape, and writes them,
a few whole volumes per chunk, into the resumable volumes store (:mod:`.volumes`; one
chunk's work is :mod:`.conversion`). Entry point: :func:`raptorz.convert`. Never imports
the embedding or downstream stages; the embedding stage reads the store it writes.
"""
