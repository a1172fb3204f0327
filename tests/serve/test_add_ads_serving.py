"""New ads on a running deployment, over real HTTP on 127.0.0.1: a real Ray Serve graph (two
Matcher replicas -> an LLM Generator on a tiny model) with the Admin application on its own
port, a real ScaNN index and a real Redis store. ``POST /admin/ads/new`` refuses unusable ads
with nothing changed; a good call writes the S-IDs and a new index version, every matcher
replica swaps to it and every generator replica reloads the S-ID table (its trie); the new ad
is then recommended to a user whose history matches it.

In-process (no Ray), the same catalog change reaches the LLM decoder's trie (the new S-ID is
a path of tokens the model knows) and the embedding engine's candidates."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace

import httpx
import pytest

from leadre.index.context import user_contexts
from leadre.serve import GeneratorConfig, MatcherConfig, ServeConfig, ServePaths
from leadre.serve.config import serving_generation
from leadre.serve.generator import CATALOG_META_KEY, GeneratorCore
from leadre.serve.store import open_store
from leadre.sids import load_table
from leadre.artifacts import read_table

import redis_server
from conftest import free_port
from load_client import wait_http
from serving_world import make_world, tiny_model

redis = redis_server.redis  # the module-scoped redis-server fixture, under its name

APP = "leadre-add-ads-test"
TOKEN = "add-ads-token"
FAN = "fan-of-the-new-ad"


@pytest.fixture(scope="module")
def world(tmp_path_factory, redis):
    root = tmp_path_factory.mktemp("add_ads_serving")
    w = make_world(root, ads=300, users=60)
    w["model"] = tiny_model(w, root / "sft", prompts=60)
    w["store"] = redis.url
    ads = read_table(w["ingest"], "ads").to_pylist()
    # A new ad in the catalog's words, unlike any one ad: three titles run together.
    w["new_ad"] = {"ad_id": "brand-new-ad", "title": " ".join(a["title"] for a in ads[10:13]),
                   "category": ads[10]["category"], "ecpm": 1.0}
    contexts = user_contexts(w["ingest"], max_events=50)
    # A user whose history is the new ad's text (three plays of a video with that title).
    contexts[FAN] = {"profile": {}, "categories": [], "events": [
        {"ts": 1.7e9 + i, "domain": "video", "action": "play", "ad_id": None,
         "title": w["new_ad"]["title"]} for i in range(3)]}
    w["contexts"] = contexts
    with open_store(w["store"]) as store:
        store.clear()
        store.put_users(contexts)
    return w


@pytest.fixture(scope="module")
def server(ray_local, world):
    from ray import serve

    from leadre.serve.app import admin_app_name, build, build_admin

    port, admin_port = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ServeConfig(index_dir=world["index"], sids_dir=world["sids"], store_url=world["store"],
                      model_dir=world["model"], app_name=APP,
                      matcher=MatcherConfig(num_cpus=0.05, num_replicas=2, admin_token=TOKEN,
                                            admin_port=admin_port, admin_host="127.0.0.1",
                                            store_deadline_ms=250.0),
                      generator=GeneratorConfig(
                          generation=replace(serving_generation(), num_gpus=0, num_cpus=0.05,
                                             beam_size=8, top_k=8, batch_size=8),
                          poll_interval_s=0.2))
    serve.run(build(cfg), name=APP, route_prefix="/", blocking=False)
    serve.run(build_admin(cfg), name=admin_app_name(cfg), route_prefix=None, blocking=False)
    public, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    wait_http(f"{public}/healthz", timeout=240)
    wait_http(f"{admin}/healthz")
    yield {"public": public, "admin": admin}
    serve.shutdown()


def infos(deployment: str) -> list[dict]:
    from ray import serve

    return serve.get_deployment_handle(deployment, APP).broadcast("info").results(timeout_s=60)


def recommend(public: str, user_id: str, **kw) -> dict:
    r = httpx.post(f"{public}/recommend", json={"user_id": user_id, "k": 10, **kw}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_admin_call_adds_an_ad_that_is_recommended_at_once(server, world):
    auth = {"authorization": f"Bearer {TOKEN}"}
    admin, public = server["admin"], server["public"]
    new = world["new_ad"]
    n = len(load_table(world["sids"]))
    before = httpx.get(f"{public}/healthz").json()
    assert before["catalog_ads"] == n
    interest = [{"domain": "video", "action": "play", "title": new["title"]}]
    assert new["ad_id"] not in [a["ad_id"] for a in recommend(
        public, "anon-fan", recent_events=interest)["ads"]]

    # Refused: no token; a body that is not ads; an unusable ad beside a good one (all or
    # nothing, the bad one named with its reason); an ad already in the catalog.
    assert httpx.post(f"{admin}/admin/ads/new", json={"ads": [new]}).status_code == 401
    assert httpx.post(f"{admin}/admin/ads/new", json={"ads": []},
                      headers=auth).status_code == 422
    r = httpx.post(f"{admin}/admin/ads/new", headers=auth, timeout=60, json={
        "ads": [new, {"ad_id": "no-title-ad", "category": "x"}]})
    assert r.status_code == 400, r.text
    assert "ad 'no-title-ad': title is required" in r.json()["error"]
    assert r.json()["details"] == [{"ad": "'no-title-ad'",
                                    "reason": "title is required (missing_required_field)"}]
    known = read_table(world["ingest"], "ads").column("ad_id")[0].as_py()
    r = httpx.post(f"{admin}/admin/ads/new", headers=auth, timeout=60, json={
        "ads": [{"ad_id": known, "title": new["title"], "category": "x"}]})
    assert r.status_code == 400 and "already in the catalog" in r.json()["error"], r.text
    assert len(load_table(world["sids"])) == n  # nothing written
    assert {i["index_version"] for i in infos("Matcher")} == {before["index_version"]}

    # Added: S-ID, new index version, both matcher replicas on it.
    t0 = time.time()
    r = httpx.post(f"{admin}/admin/ads/new", json={"ads": [new]}, headers=auth, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["replicas"] == 2 and out["ads"] == n + 1
    assert out["sid_version"] == before["sid_version"]  # the model's S-ID language stays
    sid = out["added"][0]["sid"]
    assert load_table(world["sids"]).sid(new["ad_id"]) == sid
    for info in infos("Matcher"):
        assert info["index_version"] == out["index_version"] != before["index_version"]
        assert info["catalog_ads"] == n + 1 and info["index_dir"] == out["index_dir"]
    with open_store(world["store"]) as store:
        assert json.loads(store.get_meta(CATALOG_META_KEY))["ads"] == n + 1

    # Every generator replica reloads the table (and rebuilds its trie) within its poll.
    deadline = time.time() + 30
    while any(i["catalog_ads"] != n + 1 for i in infos("Generator")):
        assert time.time() < deadline, infos("Generator")
        time.sleep(0.2)
    print(f"added and followed everywhere in {time.time() - t0:.1f} s")

    # The user whose history matches it gets it (a miss: real-time ANN over the new index,
    # from the stored history), and so does an anonymous request showing the same interest.
    answer = recommend(public, FAN)
    assert answer["cache"] == "miss" and answer["queued"], answer
    assert new["ad_id"] in [a["ad_id"] for a in answer["ads"]][:3], answer
    anon = recommend(public, "anon-fan", recent_events=interest)
    assert new["ad_id"] in [a["ad_id"] for a in anon["ads"]][:3], anon

    # The miss queued the user: the generator (its trie reloaded) writes candidates of
    # active ads under the same S-ID version. The tiny untrained LM's beam does not pick the
    # new ad by itself; the dense head of the fused path will (then: `assert sid in rec.sids`).
    deadline = time.time() + 60
    with open_store(world["store"]) as store:
        while (rec := store.get(FAN)) is None:
            assert time.time() < deadline, "the generator wrote no candidates for the fan"
            time.sleep(0.2)
    table = load_table(world["sids"])
    assert rec.sid_version == out["sid_version"] and (table.rows_of_sids(rec.sids) >= 0).all()
    # Generated candidates name it by its S-ID: the matcher maps that S-ID to the new ad.
    from leadre.serve.store import CandidateRecord

    with open_store(world["store"]) as store:
        store.put(CandidateRecord("cached-fan", [sid], [0.0], "sft-x", out["sid_version"]),
                  ttl_s=600)
    hit = recommend(public, "cached-fan")
    assert hit["cache"] == "hit" and hit["ads"][0] == {"ad_id": new["ad_id"], "score": 0.0,
                                                       "source": "generated"}, hit


def test_the_catalog_change_reaches_the_decoders_trie_and_the_embedding_engine(world, tmp_path):
    """In-process: a generator core started before the ads were added follows the store's
    catalog record: the LLM decoder's trie holds the new S-ID (tokens the model knows); the
    embedding engine's candidates for the user whose history matches it include it."""
    from leadre.index.add_ads import add_ads

    sids = tmp_path / "sids"
    shutil.copytree(world["sids"], sids)
    index = tmp_path / "index"
    shutil.copytree(world["index"], index)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    with open_store(url) as store:
        store.put_users(world["contexts"])
    gen = GeneratorConfig(generation=replace(serving_generation(), beam_size=8, top_k=8))
    llm = GeneratorCore(gen, ServePaths(str(sids), url, model_dir=world["model"]))
    emb = GeneratorCore(gen, ServePaths(str(sids), url, index_dir=str(index)))
    assert not llm.follow_catalog() and not emb.follow_catalog()
    new = {**world["new_ad"], "ad_id": "another-new-ad"}
    out = add_ads(str(sids), str(index), [new])
    with open_store(url) as store:
        store.set_meta(CATALOG_META_KEY, json.dumps({k: out[k] for k in (
            "ads", "catalog", "sid_version", "index_dir", "index_version")}))
    assert llm.follow_catalog() and emb.follow_catalog()
    assert not llm.follow_catalog()  # once

    table = llm.table
    row = table.rows_of([new["ad_id"]])[0]
    tokens = llm.llm.tokenizer.convert_tokens_to_ids(table.sid_tokens(new["ad_id"]))
    assert llm.llm.tokenizer.unk_token_id not in tokens  # no token the model lacks
    node = llm.llm.trie.node_of(tokens)
    assert llm.llm.trie.rows([node])[0] == row  # a complete path of the decoder's trie
    cands = llm.candidates([world["contexts"][FAN]])[0]
    assert cands and all(table.rows_of_sids([s])[0] >= 0 for s, _ in cands)

    got = [s for s, _ in emb.candidates([world["contexts"][FAN]])[0]]
    assert emb.table.sid(new["ad_id"]) in got[:3], got


def test_a_new_ad_reaches_the_fused_ranking_through_the_dense_head_and_the_new_index(
        world, tmp_path):
    """The second path: a generator whose model has a dense head (here one that points the
    fan's prompt state at the new ad's vector, as a trained head would for a user whose
    history is that ad's text), started before the ads were added, follows the catalog: the
    new index version answers the dense query and the fused candidates hold the new ad, which
    the tiny LM's beam alone does not reach."""
    import torch

    from leadre.artifacts import read_manifest
    from leadre.index.add_ads import add_ads
    from leadre.index.context import build_prompt
    from leadre.model import dense
    from leadre.sids.ann import load_embeddings

    for name in ("sids", "index", "probe_sids", "probe_index"):
        shutil.copytree(world[name.replace("probe_", "")], tmp_path / name)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    with open_store(url) as store:
        store.put_users(world["contexts"])
    new = {**world["new_ad"], "ad_id": "dense-new-ad"}
    # the new ad's vector, from the frozen encoder (a throwaway extension of a copy)
    add_ads(str(tmp_path / "probe_sids"), str(tmp_path / "probe_index"), [new])
    ids, emb = load_embeddings(str(tmp_path / "probe_sids"))
    vector = torch.from_numpy(emb[list(ids).index(new["ad_id"])])
    # the fan's prompt state under the tiny model, as the generator will compute it
    gen = GeneratorConfig(generation=replace(serving_generation(), beam_size=8, top_k=8))
    plain = GeneratorCore(gen, ServePaths(str(tmp_path / "sids"), url,
                                          model_dir=world["model"]))
    ctx = world["contexts"][FAN]
    prompt = build_prompt(ctx, plain.table, cfg=plain.prompt_cfg,
                          content_of=plain.content_of([ctx]))
    capture = dense.HiddenCapture(plain.llm.model, keep="first")
    with torch.no_grad():
        plain.llm.model(**plain.llm.encode([prompt]))
    state = capture.pop()[0, -1].float()
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    head = dense.DenseHead(state.numel(), vector.numel(), temperature=0.01)
    head.weight.data.copy_(torch.outer(vector, state) / state.dot(state))
    dense.save(model / dense.DENSE_DIR, head, dense.DenseMeta(
        encoder_version=read_manifest(world["sids"]).get("encoder_version"),
        sid_version=plain.table.version, hidden_size=state.numel(), dim=vector.numel(),
        temperature=0.01, fusion_weight=0.5))
    dense.save_trained_ads(model / dense.DENSE_DIR, plain.table.ad_id_array.tolist())

    fused = GeneratorCore(gen, ServePaths(str(tmp_path / "sids"), url, model_dir=str(model),
                                          index_dir=str(tmp_path / "index")))
    assert fused.llm.fused and fused.llm.index is not None  # ScaNN answers the dense query
    out = add_ads(str(tmp_path / "sids"), str(tmp_path / "index"), [new])
    with open_store(url) as store:
        store.set_meta(CATALOG_META_KEY, json.dumps({k: out[k] for k in (
            "ads", "catalog", "sid_version", "index_dir", "index_version")}))
    assert fused.follow_catalog()
    assert fused.index_dir == out["index_dir"] and new["ad_id"] in fused.llm.index.ad_ids
    assert fused.llm.unseen[fused.table.rows_of([new["ad_id"]])[0]]  # never trained on
    sid = fused.table.sid(new["ad_id"])
    assert [s for s, _ in fused.candidates([ctx])[0]][0] == sid
    rows, scores, users = fused.llm.decode([prompt])
    beam_alone = fused.llm.candidates(rows[:, :8], scores[:, :8])[0]
    assert sid not in [c.sid for c in beam_alone]
