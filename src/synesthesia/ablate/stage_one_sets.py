"""What each privileged source of the ablation needs from stage one: its generators, overrides and sidecar sets.

``latent`` (DLA) runs ``shard.generators`` (the generating model, no decode);
``real`` runs ``tae`` over the true paired signal of each of
``train.modalities`` (encode mode); ``decoded`` runs the ``latent`` generators
again with ``shard.decode: true``, which writes the decoded sidecar (the
decode-encode loop). ``ablate.generators.<source>`` replaces a source's
defaults; a labelled source (``latent@weak``, see :func:`~synesthesia.ablate.grid.source_kind`)
has only those. :func:`stage_one_overrides` are the ``synesthesia shard`` overrides
that write a source's sets, :func:`data_overrides` the ``synesthesia train``
overrides that read them (named explicitly, no search among sets) and
:func:`sidecar_dirs` where they lie under the shards root.
"""

from __future__ import annotations

import json
from pathlib import Path

from synesthesia import UserError
from synesthesia.ablate.grid import source_kind
from synesthesia.config import GeneratorConfig, PipelineConfig, to_dict


def source_generators(cfg: PipelineConfig, source: str) -> tuple[list[GeneratorConfig], bool]:
    """The stage-one generators of a privileged source and whether stage one decodes (``decoded``)."""
    kind = source_kind(source)
    if kind == "none":
        return [], False
    if source in cfg.ablate.generators:
        gens = list(cfg.ablate.generators[source])
    elif kind != source:
        gens = []
    elif kind in ("latent", "decoded"):
        gens = list(cfg.shard.generators)
    else:  # real: the true paired signal, encoded by the pretrained TAEF2
        gens = [GeneratorConfig(name="tae", modality=m) for m in cfg.train.modalities]
    if not gens:
        raise UserError(
            f"privileged source {source!r} has no stage-one generator: set shard.generators "
            f"or ablate.generators.{source}"
        )
    missing = sorted(set(cfg.train.modalities) - {g.modality for g in gens})
    if missing:
        raise UserError(
            f"source {source!r}: no generator for modality {missing[0]} of train.modalities "
            f"(set ablate.generators.{source})"
        )
    return gens, kind == "decoded"


def _set_name(g: GeneratorConfig) -> str:
    from synesthesia.stage_one import set_name

    return set_name(g)


def stage_one_overrides(cfg: PipelineConfig, source: str) -> list[str]:
    gens, decode = source_generators(cfg, source)
    data = [{k: v for k, v in to_dict(g).items() if v not in (None, {})} for g in gens]
    return [f"shard.generators={json.dumps(data, sort_keys=True)}", f"shard.decode={str(decode).lower()}"]


def data_overrides(cfg: PipelineConfig, source: str) -> list[str]:
    """``train.source`` and the sidecar sets it reads, named explicitly (no search among sets)."""
    over = [f"train.source={source_kind(source)}"]
    if source != "none":
        gens, _ = source_generators(cfg, source)
        sets = {g.modality: _set_name(g) for g in gens if g.modality in cfg.train.modalities}
        over.append(f"train.latent_sets={json.dumps(sets, sort_keys=True)}")
    return over


def sidecar_dirs(cfg: PipelineConfig, shards: Path, source: str) -> list[Path]:
    gens, decode = source_generators(cfg, source)
    kind = "decoded" if decode else "latents"
    return [shards / cfg.dataset / kind / _set_name(g) for g in gens]
