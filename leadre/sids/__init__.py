"""Stage 2: Semantic IDs. Ad text -> embedding -> residual quantisation -> unique S-IDs
(``<a_12><b_6><c_22><d_36><e_0>``), with an ad_id <-> S-ID table and a prefix trie over active
ads for constrained decoding. See ``build.py`` for the artifact layout.

The names below are imported on first use: ``leadre.sids.table`` (the S-ID format, needed by
prompt building in every Ray Data worker and by serving) must stay importable without the
quantisers' torch, which an eager import of ``build`` would load.
"""

from importlib import import_module

_WHERE = {
    "run": "build", "load_table": "build", "load_trie": "build",
    "SidConfig": "config",
    "SidTable": "table", "format_sid": "table", "parse_sid": "table",
    "SidTrie": "trie", "ROOT": "trie", "DEAD": "trie",
}

__all__ = ["SidConfig", "run", "SidTable", "SidTrie", "ROOT", "DEAD", "load_table", "load_trie",
           "format_sid", "parse_sid"]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
