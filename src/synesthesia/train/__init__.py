"""Stage two: data over source + sidecar shards, the accelerate loop, checkpoints, export, eval."""

from synesthesia.train.checkpoint import default_run_name, run_dir, teacher_dir
from synesthesia.train.export import export_student, load_student
from synesthesia.train.loop import train

__all__ = ["default_run_name", "export_student", "load_student", "run_dir", "teacher_dir", "train"]
