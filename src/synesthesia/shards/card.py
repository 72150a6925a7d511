"""The dataset card: ``<out>/<dataset>/README.md``, so that ``datasets`` alone reads every shard set.

:func:`write_dataset_card` is called whenever a set's manifest is written (render, ingest, the end of
stage one). It lists every complete set of the dataset root (a folder with a readable manifest) as
one ``configs:`` entry of the card's YAML - ``source``, ``latents-<set>``, ``decoded-<set>`` - each
with its splits (``train``, ``val``, ``test``, ``paired``) as ``data_files`` globs, and one
``dataset_info:`` entry with its features and split sizes, so that::

    datasets.load_dataset("<out>/<dataset>", name="latents-tae-depth", split="train")

reads the set offline with every column. ``audio.flac`` is declared ``binary`` (the bytes), not
``Audio``: ``datasets`` decodes audio with torchcodec, which these machines lack; the card says
how to decode it. The card also says what the set is (modalities, generator and weights, counts),
which software wrote it, how to make it again, and carries a license placeholder (``unknown``):
a license the user puts in the YAML is kept when the card is written again. A ``README.md`` that
this module did not write is left alone (with a warning). The root may be local or in a bucket
(``synesthesia.storage``).
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import DatasetCard, DatasetCardData

from synesthesia import UserError
from synesthesia.shards.schema import IMAGE_FIELDS, MANIFEST, SIGNAL_FIELDS, SPLITS
from synesthesia.shards.writer import Manifest
from synesthesia.storage import as_path, atomic_write_text, is_remote, read_capped
from synesthesia.utils import UnsafeFile

logger = logging.getLogger(__name__)

CARD = "README.md"
MARKER = "<!-- written by synesthesia from the sets' manifests: edit the license, not the rest -->"
LICENSE_PLACEHOLDER = "unknown"
MAX_CARD_BYTES = 4 << 20
_SET_NAME = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$")


# ----------------------------------------------------------------------------- the sets


def dataset_sets(root: str | Path) -> list[tuple[str, str, Manifest]]:
    """(config name, folder relative to ``root``, manifest) of every complete set under ``root``:
    ``source``, then ``latents/<set>`` and ``decoded/<set>`` in name order. A set without a manifest
    is not listed (it is being written); one with an unreadable manifest is skipped with a warning."""
    root = as_path(root)
    folders = [("source", "source")]
    for kind in ("latents", "decoded"):
        if (root / kind).is_dir():
            for path in sorted((root / kind).iterdir()):
                if path.is_dir() and _SET_NAME.match(path.name):
                    folders.append((f"{kind}-{path.name}", f"{kind}/{path.name}"))
    sets = []
    for config, folder in folders:
        if not (root / folder / MANIFEST).is_file():
            continue
        try:
            sets.append((config, folder, Manifest.read(root / folder)))
        except UserError as exc:
            logger.warning("dataset card: %s left out (%s)", folder, exc)
    return sets


def _array(shape: list[int], dtype: str) -> dict[str, Any]:
    """The YAML of a fixed-shape array feature (``array2_d`` … ``array5_d``; nested lists otherwise)."""
    if 2 <= len(shape) <= 5:
        return {"dtype": {f"array{len(shape)}_d": {"shape": list(shape), "dtype": dtype}}}
    inner: Any = dtype
    for _ in shape:
        inner = {"list": inner}
    return inner


def _matrix(name: str) -> dict[str, Any]:
    """An H×W float32 array of any size (depth, LiDAR range and intensity)."""
    return {"name": name, "list": {"list": "float32"}}


def set_features(m: Manifest) -> list[dict[str, Any]]:
    """The ``features`` of one set, in the YAML form ``datasets.Features._from_yaml_list`` reads."""
    extra = m.extra or {}
    features: list[dict[str, Any]] = [{"name": "__key__", "dtype": "string"}]
    if m.kind == "source":
        images = extra.get("image_fields")
        images = [f for f in images if f in IMAGE_FIELDS] if isinstance(images, list) else list(IMAGE_FIELDS)
        features += [{"name": name, "dtype": "image"} for name in images]
        names = extra.get("class_names")
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            features.append(
                {"name": "cls", "dtype": {"class_label": {"names": {str(i): n for i, n in enumerate(names)}}}}
            )
        else:
            features.append({"name": "cls", "dtype": "int64"})
        features.append({"name": "json", "dtype": "json"})
        modalities = extra.get("modalities") if isinstance(extra.get("modalities"), list) else []
        for modality, name in SIGNAL_FIELDS.items():
            if modality not in modalities:
                continue
            features.append({"name": name, "dtype": "binary"} if modality == "audio" else _matrix(name))
            if modality == "lidar":
                features.append(_matrix("lidar_intensity.npy"))
        return features
    spec = m.latent_spec or {}
    modality = str(extra.get("modality", (m.generator or {}).get("modality", "")))
    if m.kind == "latent":
        shape = list(spec.get("shape") or [])
        if (spec.get("samples_per_input") or 1) > 1:
            shape = [spec["samples_per_input"], *shape]
        name = str(extra.get("field", f"{modality}.latent.npy"))
        features.append({"name": name, **_array(shape, str(spec.get("dtype", "float16")))})
    else:
        name = str(extra.get("field", f"{modality}.decoded.npy"))
        features.append({"name": name, **_array(list(extra.get("shape") or []), "float32")})
    # a flagged sample (its latent all zeros) holds the reason; the others hold null
    features.append({"name": str(extra.get("flag_field", f"{modality}.flag.txt")), "dtype": "string"})
    return features


# ----------------------------------------------------------------------------- the card


_SIZES = ("n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M", "100M<n<1B")


def _size_category(n: int) -> str:
    """The Hub's ``size_categories`` value for ``n`` samples."""
    for power, label in enumerate(_SIZES, start=3):
        if n < 10**power:
            return label
    return "1B<n<10B"


def _overrides(prefix: str, values: dict[str, Any]) -> list[str]:
    """``prefix.key=value`` overrides of every non-null value (lists and mappings as flow YAML)."""
    out = []
    for key, value in values.items():
        if value is None:
            continue
        text = json.dumps(value) if isinstance(value, list | dict | bool) else str(value)
        out.append(shlex.quote(f"{prefix}{key}={text}"))
    return out


def _command(m: Manifest) -> str:
    """The ``synesthesia`` command line that writes this set again (any pipeline file will do: the
    overrides set every value the set depends on)."""
    config = m.config or {}
    head = ["synesthesia"]
    if m.kind == "source" and isinstance(config.get("scenes"), dict):
        verb = [
            "render",
            "--out",
            "OUT",
            "PIPELINE.yaml",
            f"dataset={m.dataset}",
            f"seed={config.get('seed', 0)}",
        ]
        return " ".join(head + verb + _overrides("scenes.", config["scenes"]))
    if m.kind == "source":
        ingest = config.get("ingest") if isinstance(config.get("ingest"), dict) else {}
        verb = [
            "ingest",
            "--out",
            "OUT",
            "PIPELINE.yaml",
            f"dataset={m.dataset}",
            f"seed={config.get('seed', 0)}",
        ]
        return " ".join(head + verb + _overrides("ingest.", ingest))
    generator = config.get("generator") if isinstance(config.get("generator"), dict) else {}
    generator = {k: v for k, v in generator.items() if v is not None and v != {}}
    verb = ["shard", "--out", "OUT", "PIPELINE.yaml", f"dataset={m.dataset}"]
    verb += _overrides("shard.", {"generators": [generator]})
    if m.kind == "decoded":
        verb.append("shard.decode=true")
    return " ".join(head + verb)


def _modalities(m: Manifest) -> list[str]:
    listed = (m.extra or {}).get("modalities")
    return ["rgb", *(x for x in listed if x != "rgb")] if isinstance(listed, list) else ["rgb"]


def _describe_set(config: str, folder: str, m: Manifest) -> list[str]:
    extra = m.extra or {}
    counts = ", ".join(f"{split} {m.count(split)}" for split in SPLITS if m.splits.get(split))
    lines = [f"### `{config}` (`{folder}/`, {m.kind})", "", f"- Samples: {counts}."]
    if m.kind == "source":
        modalities = ", ".join(_modalities(m))
        lines.append(f"- Modalities: {modalities}; {extra.get('num_classes', '?')} classes.")
        made = extra.get("generator") or extra.get("format") or "ingest"
        lines.append(f"- Made by: `{made}`.")
    else:
        g = m.generator or {}
        spec = m.latent_spec or {}
        lines.append(
            f"- Generator: `{g.get('name')}` ({g.get('class')}), {g.get('mode')} {g.get('modality')};"
            f" weights `{json.dumps(g.get('weights'))}`, sha256 `{json.dumps(g.get('sha256'))}`."
        )
        if m.kind == "latent":
            lines.append(
                f"- Latents: {spec.get('kind')} {spec.get('shape')} {spec.get('dtype')}, stored as"
                f" {spec.get('stored_as')}, {spec.get('samples_per_input', 1)} sample(s) per input;"
                f" scaling factor {spec.get('scaling_factor')} and shift {spec.get('shift_factor')}"
                f" {'applied' if spec.get('scaling_applied') else 'not applied'}."
            )
        else:
            lines.append(f"- Decoded signals (the ablation): shape {extra.get('shape')}, float32.")
        flagged = sum((extra.get("flag_counts") or {}).values())
        if flagged:
            lines.append(
                f"- Flagged samples (latent all zeros, reason in `{extra.get('flag_field')}`): {flagged}."
            )
    if m.software:
        versions = ", ".join(f"{k} {v}" for k, v in m.software.items() if v is not None)
        lines.append(f"- Written with: {versions}.")
    lines += ["- Made with:", "", "  ```bash", f"  {_command(m)}", "  ```", ""]
    return lines


def build_card(root: str | Path, sets: list[tuple[str, str, Manifest]], license: str) -> DatasetCard:
    """The card of ``root`` listing ``sets`` (from :func:`dataset_sets`)."""
    root = as_path(root)
    source = next((m for config, _, m in sets if config == "source"), None)
    dataset = sets[0][2].dataset
    configs, infos = [], []
    for config, folder, m in sets:
        splits = [split for split in SPLITS if m.splits.get(split)]
        entry: dict[str, Any] = {
            "config_name": config,
            "data_files": [{"split": split, "path": f"{folder}/{split}-*.tar"} for split in splits],
        }
        if config == "source":
            entry["default"] = True
        configs.append(entry)
        infos.append(
            {
                "config_name": config,
                "features": set_features(m),
                # num_bytes: the split's tar bytes (``datasets`` checks only num_examples)
                "splits": [
                    {
                        "name": split,
                        "num_bytes": sum(s.bytes for s in m.splits[split]),
                        "num_examples": m.count(split),
                    }
                    for split in splits
                ],
            }
        )
    total = sum((source or sets[0][2]).count(split) for split in SPLITS)
    data = DatasetCardData(
        license=license,
        pretty_name=f"synesthesia {dataset}",
        tags=["synesthesia", "webdataset", "latents", "multimodal"],
        task_categories=["image-classification"],
        size_categories=[_size_category(total)],
        configs=configs,
        dataset_info=infos,
    )
    modalities = ", ".join(_modalities(source) if source else ["rgb"])
    example = next((c for c, _, _ in sets if c != "source"), "source")
    body = [
        MARKER,
        "",
        f"# {dataset}",
        "",
        f"Shard sets written by synesthesia (Direct Latent Augmentation): a source set"
        f" ({modalities}) and, beside it, one sidecar set per frozen generator holding the undecoded latents"
        " (`latents-*`) or their decodings (`decoded-*`, the ablation). Every set is webdataset tar shards"
        " (format v1) with a `manifest.json` (generator, weights sha256, latent spec, channel statistics,"
        " resolved config, per-shard sha256). A sidecar row has the `__key__` of the source row it was made"
        " from, in the same split.",
        "",
        "## Use",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'source = load_dataset("OUT/{root.name}", name="source")  # the folder holding this card',
        f'sidecar = load_dataset("OUT/{root.name}", name="{example}", split="train")',
        "```",
        "",
        'Arrays (`*.npy`) load as nested lists (`.with_format("numpy")` gives arrays). `audio.flac` is'
        " the FLAC file's bytes (mono, rate in the row's `json`): decode it with"
        ' `soundfile.read(io.BytesIO(row["audio.flac"]))`, or, where torchcodec is installed,'
        ' `ds.cast_column("audio.flac", datasets.Audio())`.',
        "",
        "## License",
        "",
        f"`{license}`"
        + (
            ": not set. Put the license of your data in this card's YAML (`license:`); it is kept when"
            " synesthesia writes the card again."
            if license == LICENSE_PLACEHOLDER
            else "."
        ),
        "",
        "## Sets",
        "",
    ]
    for config, folder, m in sets:
        body += _describe_set(config, folder, m)
    body.append(
        "`OUT` is the folder holding this dataset's folder; any pipeline file will do for `PIPELINE.yaml`,"
        " as the overrides set every value a set depends on."
    )
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")


def _existing_license(path) -> str | None:
    """The license of an existing card this module wrote (None when there is no card); raises
    ``ValueError`` when ``path`` is not such a card (a README someone else wrote)."""
    if not path.exists() and (is_remote(path) or not path.is_symlink()):
        return None
    try:
        text = read_capped(path, MAX_CARD_BYTES).decode("utf-8")
    except (UnsafeFile, OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"unreadable ({exc})") from None
    if MARKER not in text:
        raise ValueError("not written by synesthesia")
    match = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL)
    try:
        meta = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        meta = None
    license = meta.get("license") if isinstance(meta, dict) else None
    return license if isinstance(license, str) and license.isprintable() and 0 < len(license) <= 64 else None


def write_dataset_card(root: str | Path) -> Path | None:
    """Write ``root/README.md`` (atomically) for every complete set under the dataset root ``root``;
    the path, or None when there is no set or ``README.md`` is someone else's."""
    root = as_path(root)
    sets = dataset_sets(root)
    if not sets:
        return None
    path = root / CARD
    try:
        license = _existing_license(path) or LICENSE_PLACEHOLDER
    except ValueError as exc:
        logger.warning("%s is %s: the dataset card is not written", path, exc)
        return None
    atomic_write_text(path, str(build_card(root, sets, license)))
    logger.info("%s: dataset card for %s", path, ", ".join(config for config, _, _ in sets))
    return path
