"""Typed pipeline configuration: YAML (safe_load) → frozen dataclasses, with key=value overrides.

A pipeline file is a YAML mapping whose top-level keys are the sections below.
Every section is a frozen dataclass; unknown keys are errors that name the valid
ones, and values are type-checked. Overrides use dotted paths
(``train.lr=1e-3``, ``shard.generators.0.batch_size=8``); a bare key is looked up
in the section of the verb being run (``synesthesia train p.yaml stage=teacher``).

Modules: ``sections`` (the dataclasses), ``building`` (dict ↔ dataclass, the
config hash), ``checks`` (every number's bounds, the names that become folders),
``loading`` (YAML files, overrides, the written config). Every name below is
importable from ``synesthesia.config``.
"""

from synesthesia.config.building import (
    build,
    comparable,
    config_hash,
    to_dict,
    training_hash,
    written_config,
)
from synesthesia.config.checks import BOUNDS, check_pipeline, check_section
from synesthesia.config.loading import (
    apply_overrides,
    load_pipeline,
    load_yaml,
    parse_override,
    replace,
    write_resolved,
)
from synesthesia.config.sections import (
    AblateConfig,
    BootstrapConfig,
    GeneratorConfig,
    IngestConfig,
    MethodConfig,
    PipelineConfig,
    ScenesConfig,
    ShardConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)

__all__ = [
    "BOUNDS",
    "AblateConfig",
    "BootstrapConfig",
    "GeneratorConfig",
    "IngestConfig",
    "MethodConfig",
    "PipelineConfig",
    "ScenesConfig",
    "ShardConfig",
    "StudentConfig",
    "TeacherConfig",
    "TrainConfig",
    "apply_overrides",
    "build",
    "comparable",
    "training_hash",
    "check_pipeline",
    "check_section",
    "config_hash",
    "load_pipeline",
    "load_yaml",
    "parse_override",
    "replace",
    "to_dict",
    "write_resolved",
    "written_config",
]
