"""Stage 7: the ScaNN index over active ads. ``leadre.index.ann`` is the ANN library (searchers,
exact search, :class:`AdIndex`); ``leadre.index.build`` is the ``leadre index`` stage."""

from leadre.index.ann import AdIndex, load_embeddings
from leadre.index.build import IndexConfig, run

__all__ = ["AdIndex", "IndexConfig", "load_embeddings", "run"]
