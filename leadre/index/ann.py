"""An index directory of stage 7, loaded: :class:`AdIndex` (built by
:mod:`leadre.index.build`; the ScaNN wrapper itself is :mod:`leadre.sids.ann`).

String doc ids would be stored by ScaNN in a pickle; we index by row number and keep the
ad_id mapping in parquet, load the searcher without ScaNN's pickle-reading loader, and refuse
any directory that fails :mod:`leadre.index.verify` (outside the index root, holding a pickle,
or not matching its manifest's content hash).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from leadre.artifacts import read_json, read_table, resolve
from leadre.index.verify import check_under_root, verify_index_dir
from leadre.sids.ann import normalize

log = logging.getLogger(__name__)

STAGE = "index"
INDEX_JSON = "index.json"
SCANN_DIR = "scann"
ADS_TABLE = "ads"
class AdIndex:
    """A loaded index: ``search(queries, k) -> (ad_ids, scores)`` over active ads only.

    Immutable after load; the matcher swaps whole ``AdIndex`` objects, so a request that
    started on the old index finishes on it.
    """

    def __init__(self, searcher, ad_ids: np.ndarray, info: dict, ecpm: np.ndarray | None = None,
                 popular: np.ndarray | None = None, location: str = ""):
        self.searcher = searcher
        self.ad_ids = ad_ids
        self.info = info
        self.location = location
        self.ecpm = ecpm if ecpm is not None else np.zeros(len(ad_ids), np.float32)
        # Rows of the cold-start fallback list, most popular first.
        self.popular = popular if popular is not None else np.arange(min(len(ad_ids), 200))
        self.active = set(ad_ids.tolist())
        self._query = {k: v for k, v in info.get("query_params", {}).items() if v is not None}

    @property
    def version(self) -> str:
        return self.info["version"]

    @property
    def sid_version(self) -> str:
        return self.info.get("sid_version", "")

    def __len__(self) -> int:
        return len(self.ad_ids)

    def search_rows(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Row ids (-1 padded when k > #ads) and scores, best first; queries (m, d)."""
        queries = normalize(np.atleast_2d(queries))
        kk = max(1, min(k, len(self.ad_ids)))
        if len(queries) == 1:
            rows, scores = self.searcher.search(queries[0], final_num_neighbors=kk, **self._query)
            return np.asarray(rows)[None], np.asarray(scores)[None]
        rows, scores = self.searcher.search_batched(queries, final_num_neighbors=kk, **self._query)
        return np.asarray(rows), np.asarray(scores)

    def search(self, query: np.ndarray, k: int) -> list[tuple[str, float]]:
        """One query vector -> [(ad_id, score)] of the k nearest active ads."""
        rows, scores = self.search_rows(query, k)
        return [(self.ad_ids[r], float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]

    @classmethod
    def load(cls, location: str, root: str | None = None) -> "AdIndex":
        """Load an index directory written by :func:`leadre.index.build.run` after
        :func:`~leadre.index.verify.verify_index_dir` passed (and, with ``root``, only from
        under that root). A URI is copied to a local temp dir first (ScaNN reads local files)
        and the copy is what gets verified and loaded."""
        check_under_root(location, root)
        local = location
        if "://" in str(location):
            local = tempfile.mkdtemp(prefix="leadre-index-")
            pafs_copy(location, local)
        verify_index_dir(local, STAGE, SCANN_DIR)
        info = read_json(local, INDEX_JSON)
        ads = read_table(local, ADS_TABLE)
        searcher = load_scann(str(Path(resolve(local)[1]) / SCANN_DIR))
        return cls(searcher, np.asarray(ads.column("ad_id").to_pylist(), dtype=object), info,
                   ads.column("ecpm").to_numpy(zero_copy_only=False).astype(np.float32),
                   np.asarray(info.get("popular_rows", []), dtype=np.int64), location)


def load_scann(directory: str):
    """ScaNN's ``load_searcher`` minus its ``scann_docids.pkl`` unpickling: our doc ids are
    row numbers, so the searcher is built straight from the serialized assets."""
    from scann.scann_ops.py import scann_ops_pybind as sp

    assets = (Path(directory) / "scann_assets.pbtxt").read_text()
    return sp.ScannSearcher(sp.scann_pybind.ScannNumpy(directory, assets), None)


def pafs_copy(src: str, dst: str) -> None:
    fs, path = resolve(src)
    pafs.copy_files(path, dst, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
