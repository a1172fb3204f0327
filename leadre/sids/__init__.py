"""Stage 2: Semantic IDs. Ad text -> embedding -> residual quantisation -> unique S-IDs
(``<a_12><b_6><c_22><d_36><e_0>``), with an ad_id <-> S-ID table and a prefix trie over active
ads for constrained decoding. See ``build.py`` for the artifact layout."""

from leadre.sids.build import load_table, load_trie, run
from leadre.sids.config import SidConfig
from leadre.sids.table import SidTable, format_sid, parse_sid
from leadre.sids.trie import DEAD, ROOT, SidTrie

__all__ = ["SidConfig", "run", "SidTable", "SidTrie", "ROOT", "DEAD", "load_table", "load_trie",
           "format_sid", "parse_sid"]
