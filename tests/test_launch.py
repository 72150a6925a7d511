"""accelerate obeys its launcher: mixed precision, process count, trackers and their kwargs, DDP's
search for unused parameters. The launches run `synesthesia train` on a tiny set in subprocesses."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tests.stage2_shards import TINY_TRAIN, write_tiny_dataset

from synesthesia import UserError
from synesthesia.config import PipelineConfig, load_pipeline, to_dict
from synesthesia.train import run_dir, train
from synesthesia.train.build import check_config
from synesthesia.train.session import build_accelerator

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("shards"), counts={"train": 8, "val": 2, "test": 2})


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one state per process: each test builds its Accelerator from scratch."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tiny(shards, *overrides):
    return load_pipeline(None, [*TINY_TRAIN, f"train.shards={shards}", "train.epochs=1", *overrides])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: list[str], shards: Path, tmp_path: Path, *overrides: str, env=None):
    """``<launcher> -m synesthesia train`` of the tiny teacher; (completed process, run folder)."""
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("name: launch\n")
    out = tmp_path / "runs"
    cmd = [*launcher, "-m", "synesthesia", "train", str(pipeline), *TINY_TRAIN, f"train.shards={shards}"]
    cmd += ["train.stage=teacher", "train.epochs=1", "train.log_with=none", *overrides, "--out", str(out)]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")},
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT / "src"),
        "HF_HOME": str(tmp_path / "hf"),  # no accelerate config of this machine's user
        **(env or {}),
    }
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    return done, out / "launch" / "teacher-latent-s0"


# ----------------------------------------------------------------------------- mixed precision


def test_precision_unset_takes_the_launchers(fresh_accelerate, monkeypatch, tmp_path):
    """``accelerate launch --mixed_precision bf16`` (ACCELERATE_MIXED_PRECISION) stands unless
    train.precision says otherwise; no launcher: fp32."""
    assert PipelineConfig().train.precision is None
    t = PipelineConfig().train
    assert build_accelerator(t, tmp_path).mixed_precision == "no"
    for launcher, config, expected in [("bf16", None, "bf16"), ("bf16", "no", "no"), ("no", "bf16", "bf16")]:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
        t = load_pipeline(None, [f"train.precision={'null' if config is None else config}"]).train
        assert build_accelerator(t, tmp_path).mixed_precision == expected, (launcher, config)


def test_a_precision_the_machine_lacks_is_one_clear_error(fresh_accelerate, monkeypatch, tmp_path):
    """The launcher's fp8 without its library (as bf16 on a GPU without it) fails naming the setting."""
    from accelerate.utils import is_fp8_available

    if is_fp8_available():
        pytest.skip("fp8 is available here")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(UserError, match="the launcher's mixed precision fp8 is not available here"):
        build_accelerator(PipelineConfig().train, tmp_path)


def test_precision_values_are_checked():
    cfg = load_pipeline(None, ["train.precision=fp32"])
    with pytest.raises(UserError, match=r"valid: no, bf16, fp16, or null"):
        check_config(cfg)


# ----------------------------------------------------------------------------- launchers


def test_accelerate_launch_runs_two_cpu_processes_in_the_launchers_precision(shards, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (its torchrun launcher; on CPU over gloo)
    trains on two processes, in the precision the launcher names, and DDP no longer warns that it
    looked for unused parameters and found none."""
    launcher = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launcher += ["--mixed_precision", "bf16", "--dynamo_backend", "no", "--main_process_port"]
    done, run = launch([*launcher, str(_free_port())], shards, tmp_path, "train.device=cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["precision"] == "bf16"
    assert "find_unused_parameters=True" not in done.stderr


def test_accelerate_launch_cpu_with_several_processes_fails_instead_of_training_alone(shards, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process (without MPI): refused, naming
    the launches that work, rather than a run that silently trains on one."""
    launcher = [ACCELERATE, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1"]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    done, run = launch(launcher, shards, tmp_path)
    assert done.returncode != 0 and not (run / "metrics.json").exists()
    # our one line; accelerate (1.16) then echoes the child's stderr in its own traceback
    # ("RuntimeError: synesthesia train: error: ..."), which is the launcher's, not ours
    errors = [line for line in done.stderr.splitlines() if line.startswith("synesthesia train: error")]
    assert len(errors) == 1 and "--multi_gpu --num_processes N" in errors[0], done.stderr[-3000:]
    assert "torchrun --nproc_per_node N" in errors[0]


def test_accelerate_launch_cpu_alone_still_trains(shards, tmp_path):
    done, run = launch([ACCELERATE, "launch", "--cpu", "--num_processes", "1"], shards, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["processes"] == 1


# ----------------------------------------------------------------------------- DDP's unused parameters


def test_unused_parameters_are_searched_only_when_the_method_says(monkeypatch):
    """Every registered method trains under two-process DDP without the search (each was run so
    with torchrun on CPU); a method whose parameters may get no gradient on a step says so."""
    from synesthesia.methods import METHODS, Method
    from synesthesia.train.build import finds_unused_parameters

    assert not finds_unused_parameters(PipelineConfig())
    for name in METHODS.names():
        stage = getattr(METHODS.get(name), "stage", "student")
        cfg = load_pipeline(None, [f"method.name={name}", f"train.stage={stage}"])
        assert finds_unused_parameters(cfg) is False, name

    class Sometimes(Method):
        find_unused_parameters = True

    get = METHODS.get
    monkeypatch.setattr(METHODS, "get", lambda name: Sometimes if name == "sometimes" else get(name))
    cfg = PipelineConfig()
    cfg = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, name="sometimes"))
    assert finds_unused_parameters(cfg)
    # the plain teacher (cross-entropy) never searches, whatever student method the pipeline names
    assert not finds_unused_parameters(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stage="teacher"))
    )


# ----------------------------------------------------------------------------- trackers


def test_a_tracker_that_is_not_installed_is_one_clear_error(shards, monkeypatch):
    import accelerate.tracking
    from accelerate.utils import is_aim_available

    if not is_aim_available():  # really missing here
        with pytest.raises(UserError, match="train.log_with=aim needs the aim package.*pip install aim"):
            check_config(tiny(shards, "train.log_with=jsonl,aim"))
    # tensorboard is installed here: made unavailable, as on a machine without it
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(UserError, match="pip install tensorboard") as caught:
        check_config(tiny(shards, "train.log_with=tensorboard"))
    assert "\n" not in str(caught.value)


def test_tracker_kwargs_reach_the_trackers_run(shards, tmp_path, fresh_accelerate):
    """train.tracker_kwargs → init_trackers(init_kwargs=...): tensorboard's writer gets them."""
    pytest.importorskip("tensorboard")
    kwargs = "train.tracker_kwargs={tensorboard: {filename_suffix: .synesthesia-kwargs}}"
    cfg = tiny(shards, "train.stage=teacher", "train.log_with=jsonl,tensorboard", kwargs)
    train(cfg, tmp_path)
    # the run's writer (its hparams go to a writer of their own, in a subfolder)
    events = list((run_dir(cfg, tmp_path) / "logs" / cfg.name).glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].name.endswith(".synesthesia-kwargs")


def test_tracker_kwargs_name_a_tracker_of_log_with(shards):
    with pytest.raises(UserError, match=r"train.tracker_kwargs.wandb: 'wandb' is not a tracker"):
        check_config(tiny(shards, "train.log_with=jsonl", "train.tracker_kwargs={wandb: {name: r1}}"))


def test_tracker_kwargs_keep_older_runs_reusable():
    """A run written before ``train.tracker_kwargs`` existed has the same training hash."""
    from synesthesia.ablate.runner import training_hash

    cfg = PipelineConfig()
    older = to_dict(cfg)
    del older["train"]["tracker_kwargs"]
    assert cfg.train.tracker_kwargs == {} and training_hash(older) == training_hash(cfg)


def test_runs_written_with_precision_no_stay_reusable(monkeypatch):
    """``precision: "no"`` was the default before it could be unset: such a run is the same
    training as an unset one without a launcher's precision (ablate and demo reuse it), and not
    the same as one a bf16 launcher would train."""
    from synesthesia.ablate.runner import training_hash

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    cfg = PipelineConfig()
    older = to_dict(cfg)
    older["train"]["precision"] = "no"
    del older["train"]["tracker_kwargs"], older["train"]["verify"]
    assert cfg.train.precision is None and training_hash(older) == training_hash(cfg)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert training_hash(older) != training_hash(cfg)
