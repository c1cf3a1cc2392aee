"""dealrec core: the DEALRec data-pruning algorithm (data, surrogate, influence, effort, selection).

Pure Python + torch. Nothing in this package imports the web layer (`app`) or the queue (`worker`).
"""

__version__ = "0.1.0"
