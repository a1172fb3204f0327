"""The ad catalog of stage 3: what the example builder knows about every ad (S-ID, title,
category, eCPM, active, first S-ID code) and the pools DPO negatives are drawn from. The
offline metrics keep their own per-ad facts (:class:`leadre.eval.metrics.CatalogStats`):
categories as logged and training popularity, which the builder never needs."""

from __future__ import annotations

from dataclasses import dataclass, field

from leadre.prompts import templates as T


@dataclass
class Catalog:
    """Everything the builder needs to know about ads, as plain lists (cheap to pickle into
    Ray workers). Built by :meth:`from_tables` from the ingest ``ads`` table and the S-ID table.
    """

    ad_ids: list[str]
    sid: list[str | None]
    title: list[str]
    category: list[str | None]
    ecpm: list[float | None]
    active: list[bool]
    first_code: list[int | None]
    sid_version: str = ""
    # title -> the text a content event shows (PromptConfig.content_object); empty: titles
    content: dict[str, str] = field(default_factory=dict, repr=False)
    # the cold-start split's ads (leadre.sids.build.load_cold_ads): test targets only, never
    # in a training interaction, an ad-level example or a DPO pair
    cold: frozenset[str] = field(default_factory=frozenset, repr=False)
    index: dict[str, int] = field(init=False, repr=False)
    is_cold: list[bool] = field(init=False, repr=False)  # per catalog row
    candidates: list[int] = field(init=False, repr=False)  # active warm ads with an S-ID
    by_first: dict[int, list[int]] = field(init=False, repr=False)
    by_category: dict[str, list[int]] = field(init=False, repr=False)  # + eCPM known

    def __post_init__(self) -> None:
        self.index = {a: i for i, a in enumerate(self.ad_ids)}
        self.is_cold = [a in self.cold for a in self.ad_ids]
        self.candidates, self.by_first, self.by_category = [], {}, {}
        for i, (s, act) in enumerate(zip(self.sid, self.active)):
            if s is None or not act or self.is_cold[i]:
                continue
            self.candidates.append(i)
            self.by_first.setdefault(self.first_code[i], []).append(i)
            cat = self.category[i]
            if self.ecpm[i] is not None and cat is not None:
                self.by_category.setdefault(cat, []).append(i)

    @classmethod
    def from_tables(cls, ads, sid_table, cold: frozenset[str] = frozenset()) -> "Catalog":
        """``ads``: a pyarrow table in the ingest ``ADS`` schema; ``sid_table``: a
        ``leadre.sids.SidTable``; ``cold``: the cold-start split's ad ids. Ads missing from
        the S-ID table get ``sid=None`` (their events are dropped and counted)."""
        ad_ids = ads.column("ad_id").to_pylist()
        rows = sid_table.rows_of(ad_ids)
        sids = sid_table.sids(ad_ids)
        first = [int(sid_table.codes[r, 0]) if r >= 0 else None for r in rows]
        cats = [c if c and c != T.UNKNOWN_CATEGORY else None
                for c in ads.column("category").to_pylist()]
        ecpm = [None if e is None or e != e else float(e) for e in ads.column("ecpm").to_pylist()]
        return cls(ad_ids, sids, ads.column("title").to_pylist(), cats, ecpm,
                   [bool(a) for a in ads.column("active").to_pylist()], first,
                   getattr(sid_table, "version", ""), cold=frozenset(cold))

    def sid_of(self, ad_id: str) -> str | None:
        i = self.index.get(ad_id)
        return None if i is None else self.sid[i]

    def title_of(self, ad_id: str) -> str | None:
        i = self.index.get(ad_id)
        return None if i is None else self.title[i]

    def category_of(self, ad_id: str) -> str | None:
        i = self.index.get(ad_id)
        return None if i is None else self.category[i]

    def content_of(self, title: str | None) -> str | None:
        """What a content event with ``title`` shows in a prompt (its knowledge token, the
        title, or both; the title itself where the S-ID stage coded none)."""
        return self.content.get(title, title) if title else title
