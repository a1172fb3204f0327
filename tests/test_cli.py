"""The `leadre` command and the `ray job submit` entrypoints."""

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leadre import artifacts
from leadre.cli import STAGES, main
from leadre.config import ConfigError, load_config
from leadre.data.config import SynthConfig

REPO = Path(__file__).resolve().parents[1]


def _leadre(*args, **kw):
    return subprocess.run([sys.executable, "-m", "leadre.cli", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120, **kw)


def test_help_lists_every_stage():
    r = _leadre("--help")
    assert r.returncode == 0
    for stage in STAGES:
        assert stage.name in r.stdout


@pytest.mark.parametrize("stage", [s.name for s in STAGES])
def test_each_stage_help_documents_its_flags(stage):
    r = _leadre(stage, "--help")
    assert r.returncode == 0, r.stderr
    assert "--config" in r.stdout and "--set" in r.stdout and "default:" in r.stdout


def test_every_stage_has_a_ray_job_entrypoint():
    scripts = {p.name: p.read_text() for p in (REPO / "ray_jobs").glob("*.py")}
    for stage in STAGES:
        assert any(f'main(["{stage.name}", *sys.argv[1:]])' in text for text in scripts.values()), \
            f"no ray_jobs/ script runs stage {stage.name}"


def test_generate_via_cli_with_yaml_and_overrides(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"synth:\n  users: 50\n  ads: 40\n  out: {tmp_path / 'w'}\n")
    assert main(["generate", "--config", str(cfg), "--seed", "3", "--set", "ads=60"]) == 0
    m = artifacts.read_manifest(tmp_path / "w", stage="generate")
    assert m["config"]["users"] == 50 and m["config"]["ads"] == 60 and m["config"]["seed"] == 3
    assert json.loads(capsys.readouterr().out)["users"] == 50


def test_bad_config_is_a_clear_error_not_a_traceback(tmp_path):
    r = _leadre("generate", "--set", "users=lots", "--out", str(tmp_path))
    assert r.returncode == 2 and "users: expected int" in r.stderr and "Traceback" not in r.stderr
    r = _leadre("generate", "--set", "colour=blue")
    assert r.returncode == 2 and "unknown SynthConfig option(s) colour" in r.stderr
    r = _leadre("ingest", "--source", "csv")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = _leadre("generate", "--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_config_types_are_checked():
    with pytest.raises(ConfigError, match="ads: expected int"):
        load_config(SynthConfig, overrides={"ads": "many"})
    with pytest.raises(ConfigError, match="must be in"):
        load_config(SynthConfig, overrides={"ad_share": 2})
    assert load_config(SynthConfig, overrides=["ad_share=0.5"]).ad_share == 0.5


@pytest.mark.cluster
def test_ingest_job_through_ray_job_submit(ray_head, tmp_path):
    """`ray start --head` on 127.0.0.1, submit the ingest job, wait for SUCCEEDED."""
    world = tmp_path / "world"
    assert main(["generate", "--out", str(world), "--users", "80", "--ads", "40",
                 "--corrupt-share", "0.02"]) == 0
    out = tmp_path / "ingest"
    job_id = f"leadre-ingest-{int(time.time())}"
    submit = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--no-wait",
         "--submission-id", job_id,
         "--address", ray_head.dashboard, "--working-dir", str(REPO),
         "--", "python", "ray_jobs/ingest.py", "--input-dir", str(world), "--out", str(out)],
        capture_output=True, text=True, env=ray_head.env, timeout=120)
    assert submit.returncode == 0, submit.stderr

    from ray.job_submission import JobStatus, JobSubmissionClient
    client = JobSubmissionClient(ray_head.dashboard, headers=_auth_headers())
    deadline = time.time() + 300
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED,
                                                            JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "job did not finish"
        time.sleep(2)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-3000:]
    m = artifacts.read_manifest(out, stage="ingest")
    c = m["counts"]["events"]
    assert c["clean"] > 0 and c["quarantined"] > 0
    assert c["rows_in"] == c["clean"] + c["quarantined"]
    assert artifacts.read_table(out, "events").num_rows == c["clean"]


def _auth_headers():
    token = Path.home() / ".ray" / "auth_token"
    return {"Authorization": f"Bearer {token.read_text().strip()}"} if token.exists() else None


def test_stage_table_wires_real_options_to_earlier_stages():
    from leadre.stages import STAGES, config_class

    seen: set[str] = set()
    for stage in STAGES:
        options = {f.name for f in dataclasses.fields(config_class(stage.name))}
        for inp in stage.inputs:
            assert inp.option in options, f"{stage.name} has no option {inp.option}"
            assert set(inp.sources) <= seen, f"{stage.name}.{inp.option} reads a later stage"
        seen.add(stage.name)


def test_wire_points_inputs_at_upstream_outputs():
    from leadre.stages import wire

    assert wire("ingest", "/r").input_dir == "/r/world"  # the generate stage writes the world
    ev = wire("eval", "/r", {"max_rows": 7, "prompts_dir": "/elsewhere"})
    assert (ev.prompts_dir, ev.model_dir, ev.sids_dir, ev.ingest_dir, ev.out) == (
        "/r/prompts", "/r/dpo", "/r/sids", "/r/ingest", "/r/eval")
    assert ev.max_rows == 7
    # without a DPO directory the eval reads the SFT model; unwired inputs keep their value
    ev = wire("eval", {"sft": "/s", "eval": "/e"}, {"sids_dir": "/my/sids"})
    assert (ev.model_dir, ev.out, ev.sids_dir) == ("/s", "/e", "/my/sids")
    serve = wire("serve", "/r", {"port": 8123})
    assert (serve.index_dir, serve.sids_dir, serve.model_dir, serve.port) == (
        "/r/index", "/r/sids", "/r/dpo", 8123)


@pytest.mark.parametrize("argv", [["demo", "-v"], ["-v", "demo"], ["demo", "--verbose"]])
def test_verbose_flag_reaches_the_demo(argv):
    from leadre.cli import build_parser, config_from_args

    assert config_from_args(build_parser(argv).parse_args(argv)).verbose is True
    assert config_from_args(build_parser(["demo"]).parse_args(["demo"])).verbose is False


def test_null_on_the_command_line_unsets_an_optional_field():
    from leadre.cli import build_parser, config_from_args
    argv = ["eval", "--model-dir", "null", "--max-rows", "null", "--generation.beam-size", "12"]
    cfg = config_from_args(build_parser(argv).parse_args(argv))
    assert cfg.model_dir is None and cfg.max_rows is None and cfg.generation.beam_size == 12
    argv = ["eval", "--model-dir", "runs/dpo", "--max-rows", "300"]
    cfg = config_from_args(build_parser(argv).parse_args(argv))
    assert cfg.model_dir == "runs/dpo" and cfg.max_rows == 300
