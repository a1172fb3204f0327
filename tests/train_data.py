"""A small, learnable stand-in for the outputs of ``leadre sids`` and ``leadre prompts`` in the
exact artifact format the training stages read (used by the training tests and
bench/bench_train.py).

The world: 48 ads; an ad's S-ID is ``<a_category><b_tier><c_k><d_e>`` where the tier orders eCPM
(b_0 = most valuable). Each user likes one category; their prompt mentions it through video
titles and ads clicked (as S-IDs), and the next ad is in that category (so SFT can learn the
first level from the prompt). DPO pairs prefer the lower tier (higher eCPM) in the same category.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa

from leadre.artifacts import write_manifest, write_table
from leadre.sids.table import SidTable

CATEGORIES = ["tennis", "cooking", "travel", "gaming"]
TIERS = 4
ADS_PER_TIER = 3
SID_VERSION = "fixture00001"


def _ads():
    ads = []
    for cat_i, cat in enumerate(CATEGORIES):
        for tier in range(TIERS):
            for k in range(ADS_PER_TIER):
                ads.append({"ad_id": f"ad{cat_i}{tier}{k}", "category": cat, "codes": [cat_i, tier, k],
                            "title": f"{cat} offer {tier * ADS_PER_TIER + k}",
                            "ecpm": 10.0 - 2 * tier + 0.1 * k})
    return ads


def write_sids(root: Path) -> tuple[Path, SidTable, list[dict]]:
    ads = _ads()
    table = SidTable.from_codes([a["ad_id"] for a in ads], np.array([a["codes"] for a in ads]),
                                [len(CATEGORIES), TIERS, ADS_PER_TIER], version=SID_VERSION)
    out = root / "sids"
    table.save(str(out))
    write_manifest(out, "sids", inputs={"fixture": True}, config={}, counts={"ads": len(ads)},
                   timings={}, extra={"sid_version": SID_VERSION})
    for a in ads:
        a["sid"] = table.sid(a["ad_id"])
    return out, table, ads


def _prompt(rng: random.Random, cat: str, clicked: list[dict]) -> str:
    behaviour = "; ".join(
        [f"{rng.randint(1, 9)} days ago^play short video^{cat} highlights {rng.randint(1, 50)}"]
        + [f"{rng.randint(1, 9)} days ago^click on ad^{a['sid']}" for a in clicked])
    return (f"Assuming you are an ad recommendation system. The user is {rng.randint(18, 70)} "
            f"years old; interests: {cat}^{rng.randint(2, 9)} times. Recent behaviour: "
            f"{behaviour}. What ad will the user be interested in next time?")


def write_prompts(root: Path, n_users: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write ``<root>/sids`` and ``<root>/prompts``; returns both paths."""
    rng = random.Random(seed)
    sids_dir, table, ads = write_sids(root)
    by_cat = {c: [a for a in ads if a["category"] == c] for c in CATEGORIES}
    splits = {"train": 0.7, "valid": 0.15, "test": 0.15}
    sft = {s: [] for s in splits}
    dpo = {s: [] for s in splits}
    for u in range(n_users):
        split = rng.choices(list(splits), weights=list(splits.values()))[0]
        cat = rng.choice(CATEGORIES)
        for _ in range(2):
            clicked = rng.sample(by_cat[cat], 2)
            target = rng.choice(by_cat[cat])
            prompt = _prompt(rng, cat, clicked)
            sft[split].append({"prompt": prompt, "completion": target["sid"], "task": "main",
                               "user_id": f"u{u}", "target_ad_id": target["ad_id"],
                               "template": "t0"})
            good, bad = sorted(rng.sample(by_cat[cat], 2), key=lambda a: -a["ecpm"])
            if good["codes"][1] == bad["codes"][1]:
                continue
            dpo[split].append({"prompt": prompt, "chosen": good["sid"], "rejected": bad["sid"],
                               "pair_type": "value", "user_id": f"u{u}",
                               "chosen_ad_id": good["ad_id"], "rejected_ad_id": bad["ad_id"],
                               "chosen_ecpm": good["ecpm"], "rejected_ecpm": bad["ecpm"]})
    for a in ads:  # auxiliary alignment tasks, training split only
        sft["train"].append({"prompt": f"The name of ad is: {a['title']}; Type: {a['category']}; "
                                       "What is this ad?", "completion": a["sid"],
                             "task": "aux_text2sid", "user_id": "", "target_ad_id": a["ad_id"],
                             "template": "t0"})
        sft["train"].append({"prompt": f"What is the ad {a['sid']}?", "completion": a["title"],
                             "task": "aux_sid2text", "user_id": "", "target_ad_id": a["ad_id"],
                             "template": "t0"})
    out = root / "prompts"
    for split in splits:
        rng.shuffle(sft[split])
        write_table(pa.Table.from_pylist(sft[split]), out / "sft", split)
        write_table(pa.Table.from_pylist(dpo[split]), out / "dpo", split)
    write_manifest(out, "prompts", inputs={"sids_dir": str(sids_dir), "fixture": True},
                   config={"max_events": 7},  # a non-default prompt format the models record
                   counts={s: len(v) for s, v in sft.items()}, timings={},
                   extra={"sid_version": SID_VERSION})
    return {"sids": sids_dir, "prompts": out}
