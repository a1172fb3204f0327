"""Re-submitting a training run with ``resume=true`` (Ray Train restores it from ``<out>/ray``),
in the default suite: a full fine-tune whose ``leadre sft`` driver is really killed (SIGKILL)
after its first checkpoint is resubmitted and finishes, then the finished run is resubmitted
for more steps. Tiny preset, one worker, three short fits. (A worker failing inside a LoRA
run is tested in test_train.py.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_data import SID_VERSION, write_prompts  # noqa: E402

from leadre.artifacts import read_manifest  # noqa: E402

# Ray Train's checkpoint bookkeeping, which a resubmitted run restores from.
SNAPSHOT = "checkpoint_manager_snapshot.json"
# The actors of a run (Ray Train's state and placement-group cleaner actors are detached:
# they outlive their job by design).
RUN_ACTORS = {"TrainController", "RayTrainWorker"}
ONE_WORKER = dict(num_workers=1, cpus_per_worker=0.5, device="cpu")


def _flags(**kw) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]


def _latest_checkpoint(storage: Path) -> dict | None:
    """The latest checkpoint Ray Train recorded for the run (None before the first)."""
    try:
        latest = json.loads((storage / SNAPSHOT).read_text()).get("latest_checkpoint_result")
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet / being rewritten
        return None
    return latest


def _global_step(storage: Path, checkpoint_dir_name: str) -> int:
    state = storage / checkpoint_dir_name / "checkpoint" / "trainer_state.json"
    return json.loads(state.read_text())["global_step"]


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the driver's process group (this test started it in a session of its own)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


def _wait_job_dead(address: str, driver_pid: int, timeout: float = 60) -> str:
    """Ray notices the driver's death and ends its job: its actors (the Train controller and
    worker group) die with it, so nothing of the killed run writes into its storage any more."""
    from ray._private import state
    from ray.util.state import list_actors

    deadline = time.time() + timeout
    while time.time() < deadline:
        jobs = [j for j in state.jobs() if j["DriverPid"] == driver_pid]
        if jobs and jobs[0]["IsDead"]:
            alive = {a.class_name for a in list_actors(
                address=address,
                filters=[("job_id", "=", jobs[0]["JobID"]), ("state", "=", "ALIVE")])}
            if not alive & RUN_ACTORS:
                return jobs[0]["JobID"]
        time.sleep(0.5)
    raise TimeoutError(f"the job of driver pid {driver_pid} or its actors are still alive")


def test_killed_driver_resubmitted_with_resume_continues_from_its_checkpoint(ray_local, tmp_path):
    """Also the full fine-tune path end to end: no adapter, the merged model loads."""
    from leadre.cli import main
    from leadre.model.factory import load_for_inference

    world = write_prompts(tmp_path / "w", n_users=60, seed=1)
    out = tmp_path / "sft"
    storage = out / "ray" / "sft"
    max_steps, save_steps = 15, 5
    flags = _flags(prompts_dir=world["prompts"], out=out, preset="tiny", finetune="full",
                   learning_rate=3e-3, warmup_ratio=0.0, batch_size=8, save_steps=save_steps,
                   logging_steps=5, **ONE_WORKER)
    address = ray_local.get_runtime_context().gcs_address
    log_path = tmp_path / "driver.log"
    t0 = time.time()
    with open(log_path, "w") as log:
        # the `leadre` command of this environment, joined to the test session's cluster
        driver = subprocess.Popen(
            [str(Path(sys.executable).parent / "leadre"), "sft", *flags,
             f"--max-steps={max_steps}", "--set", f"ray.address='{address}'"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        deadline = time.time() + 240
        while _latest_checkpoint(storage) is None:
            if driver.poll() is not None:
                pytest.fail(f"the driver exited ({driver.returncode}) before its first "
                            f"checkpoint:\n{log_path.read_text()[-3000:]}")
            if time.time() > deadline:
                pytest.fail(f"no checkpoint after 240 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        os.kill(driver.pid, signal.SIGKILL)  # the driver itself, no warning, mid-training
        driver.wait(30)
    finally:
        _kill(driver)  # whatever the driver left in its process group
    killed_after = time.time() - t0
    job = _wait_job_dead(address, driver.pid)
    assert not (out / "manifest.json").exists()  # the killed run never looked finished
    latest = _latest_checkpoint(storage)
    saved = _global_step(storage, latest["checkpoint_dir_name"])
    assert save_steps <= saved < max_steps, saved
    logged = re.findall(r"leadre train: \{'step': (\d+)", log_path.read_text())
    print(f"\nkilled driver pid {driver.pid} (job {job}) with SIGKILL {killed_after:.1f} s "
          f"after start, at step {logged[-1] if logged else '?'} (last progress line); latest "
          f"checkpoint: step {saved} ({latest['checkpoint_dir_name']})")

    t1 = time.time()
    assert main(["sft", *flags, f"--max-steps={max_steps}", "--resume"]) == 0  # + resume
    m = read_manifest(out, stage="sft")
    t = m["training"]
    steps = [e["step"] for e in m["history"] if "loss" in e]
    print(f"resumed from checkpoint step(s) {t['resumed_from_steps']}; finished at step "
          f"{t['exported']['global_steps']} (exported step {t['exported']['step']}) in "
          f"{time.time() - t1:.1f} s; history steps {steps}")
    assert t["resumed_from_steps"] == [saved]  # not from zero, not from a later step
    assert t["exported"]["global_steps"] == max_steps
    # the history continues the killed run's: steps before the checkpoint come from it, once
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == max_steps
    assert [s for s in steps if s <= saved] == [1] + list(range(5, saved + 1, 5))
    assert m["model"] == {"source": "reused from the run being resumed"}
    assert m["sid_version"] == SID_VERSION and m["counts"]["train_examples"] > 0
    assert m["config"]["finetune"] == "full" and not (out / "adapter").exists()
    model, tok = load_for_inference(out)  # the exported full fine-tune loads for serving
    assert model.config.vocab_size == len(tok)


    # the finished run, resubmitted for 5 more steps, continues from its last checkpoint
    before = (out / "merged" / "model.safetensors").read_bytes()
    t2 = time.time()
    assert main(["sft", *flags, f"--max-steps={max_steps + 5}", "--resume"]) == 0
    m = read_manifest(out, stage="sft")
    t = m["training"]
    steps = [e["step"] for e in m["history"] if "loss" in e]
    print(f"finished run resubmitted with max_steps={max_steps + 5}: resumed from "
          f"{t['resumed_from_steps']}, finished at step {t['exported']['global_steps']} in "
          f"{time.time() - t2:.1f} s; history steps {steps}")
    assert t["resumed_from_steps"] == [saved, max_steps]
    assert t["exported"]["global_steps"] == max_steps + 5 and steps[-1] == max_steps + 5
    assert (out / "merged" / "model.safetensors").read_bytes() != before  # trained further
