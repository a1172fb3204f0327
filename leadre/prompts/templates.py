"""Prompt templates of stage 3 as data: the wording of every prompt the LLM sees lives here,
nowhere else. ``leadre.prompts`` only fills the slots.

A main-task prompt is the paper's intent-aware prompt, built from facets in this order, each
optional::

    instruction  profile  long-term categories  short-term behaviours  question

Several variants say the same thing in different words; each example picks one
deterministically (a hash of user and target), so the model does not over-fit one phrasing and
an ablation can pin one (``PromptConfig.templates``). Slots:

* ``profile``: ``{profile}`` = the known attributes rendered with :data:`PROFILE_PARTS`, joined
  by :data:`LIST_JOINER`; the whole sentence is left out when no attribute is known.
* ``categories``: ``{categories}`` = items of :data:`CATEGORY_ITEM` (``category^N times``).
* ``behaviours``: ``{behaviours}`` = items of :data:`BEHAVIOUR_ITEM`
  (``N days ago^behaviour^object``), oldest first; the object is the ad's S-ID (main task) or
  title (``aux_titles`` task) for ad events and the content title for videos and news.

Changing any string here changes the prompts: the manifest of ``leadre prompts`` records
:func:`templates_version` so serving can check it builds prompts the model was trained on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PromptTemplate:
    """One wording of the main-task prompt (see the module docstring for the slots)."""

    instruction: str
    profile: str
    categories: str
    behaviours: str
    question: str


PROMPT_TEMPLATES: tuple[PromptTemplate, ...] = (
    PromptTemplate(
        instruction="Assuming you are an ad recommendation system.",
        profile="User profile: {profile}.",
        categories="Long-term interests: {categories}.",
        behaviours="Recent behaviours: {behaviours}.",
        question="What ad will the user be interested in next time?",
    ),
    PromptTemplate(
        instruction="You are an advertising recommender that predicts the next ad for a user.",
        profile="About the user: {profile}.",
        categories="Ad categories the user engages with most: {categories}.",
        behaviours="Behaviour sequence, oldest first: {behaviours}.",
        question="Which ad will the user engage with next?",
    ),
    PromptTemplate(
        instruction="Assuming you are an ad recommendation system, read the user's interests.",
        profile="The user: {profile}.",
        categories="Long-term interest: {categories}.",
        behaviours="Short-term interest: {behaviours}.",
        question="What ad will the user be interested in next time?",
    ),
)

# Profile attributes in the order they are written; unknown (null) attributes are left out.
PROFILE_PARTS: dict[str, str] = {
    "age": "{age} years old",
    "gender": "{gender}",
    "city": "lives in {city}",
    "education": "{education} education",
    "industry": "occupation: {industry}",
}
PROFILE_JOINER = ", "

CATEGORY_ITEM = "{category}^{count} times"
BEHAVIOUR_ITEM = "{days} days ago^{behaviour}^{object}"
LIST_JOINER = "; "
FACET_JOINER = " "

# How each action reads in the behaviour sequence (paper: "play short video^badminton").
BEHAVIOURS: dict[str, str] = {
    "impression": "view ad",
    "click": "click on ad",
    "conversion": "convert on ad",
    "play": "play short video",
    "read": "read news",
}

# Auxiliary alignment tasks (ad level). text -> S-ID is the paper's; S-ID -> text is its
# reverse. ``{sid}`` is the ad's S-ID, ``{title}`` / ``{category}`` its catalog text.
TEXT2SID_PROMPTS: tuple[str, ...] = (
    "The name of ad is: {title}; Type: {category}; What is this ad?",
    "Ad title: {title}; Category: {category}; Which ad is this?",
    "Here is an ad named {title} of type {category}. What is its ID?",
)
SID2TEXT_PROMPTS: tuple[str, ...] = (
    "{sid} What are the name and type of this ad?",
    "Describe the ad {sid} by its title and category.",
    "Which ad is {sid}? Give its name and type.",
)
SID2TEXT_COMPLETION = "The name of ad is: {title}; Type: {category}"
UNKNOWN_CATEGORY = "unknown"


def templates_version() -> str:
    """Content hash (12 hex digits) of every string in this module that shapes a prompt."""
    data = {
        "prompts": [asdict(t) for t in PROMPT_TEMPLATES],
        "profile": PROFILE_PARTS, "profile_joiner": PROFILE_JOINER,
        "category_item": CATEGORY_ITEM, "behaviour_item": BEHAVIOUR_ITEM,
        "list_joiner": LIST_JOINER, "facet_joiner": FACET_JOINER, "behaviours": BEHAVIOURS,
        "text2sid": TEXT2SID_PROMPTS, "sid2text": SID2TEXT_PROMPTS,
        "sid2text_completion": SID2TEXT_COMPLETION, "unknown_category": UNKNOWN_CATEGORY,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
