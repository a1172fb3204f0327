"""Stage 7: the ScaNN index over active ads. ``leadre.index.build`` is the ``leadre index``
stage (configured by ``leadre.index.config``), ``leadre.index.ann`` a loaded index directory
(:class:`AdIndex`); the ScaNN wrapper both use is ``leadre.sids.ann``. ``context`` (what
serving knows of a user) and ``query`` (a user's events -> an ANN query) are shared with
serving, which sits above this stage."""

from leadre.index.ann import AdIndex
from leadre.index.build import run
from leadre.index.config import IndexConfig

__all__ = ["AdIndex", "IndexConfig", "run"]
