"""Stage one (`synesthesia shard`): source shards → one latent sidecar set per configured generator.

For every generator of ``shard.generators`` the runner writes
``<out>/<dataset>/latents/<set>/`` (and ``decoded/<set>/`` with
``shard.decode: true``, the decode-encode ablation), aligned shard for shard and
key for key with ``<out>/<dataset>/source/``.

Pipeline (per process)::

    DataLoader workers            main process                 writer thread
    read tar + sha256 ──► preprocess ──► batch ──► forward (autocast) ──► npy + tar (atomic)
    (data)                                        flag NaN/inf, [decode]   (writer)
                                  (set_runner)

- **Work unit = one source shard.** Shard *i* of a sidecar depends only on
  source shard *i*, the generator and its seed: batches never cross shard
  boundaries, so a rerun computes the same batches and writes the same bytes.
- **Parts.** The shards are listed in order (splits in config order, shards
  in order) and part *r* of *N* takes those at positions *i* with *i* mod *N* = *r*,
  then skips its complete ones. The part is a torchrun / ``accelerate launch``
  rank (the processes join through accelerate's ``PartialState``, NCCL on GPUs,
  gloo on CPU, and wait for each other), or an *independent* part: ``--part i/N``
  or a Slurm array / ``srun`` task (:mod:`synesthesia.parts`), which waits for
  nobody. The set folder must be on a file system every part sees.
- **Leases.** Before inference a part claims each shard with an exclusive
  ``.<shard>.lease`` file kept fresh by a heartbeat; a shard leased by another
  live job is left to it, a lease silent for ``shard.lease_timeout_s`` is taken
  over. Two jobs given the same part never both compute a shard.
- **Resume.** A shard that exists under its final name is complete and is
  skipped. Temporary files of a killed run are removed at start.
- **Cache key.** ``cache_key.json`` holds the sha256 of the generator's
  identity and config, its latent spec, the settings that change the bytes
  (batch size, precision, device type, storage dtype, channels_last,
  attention backend) and the source shards' sha256s. A different key is
  refused unless ``--overwrite``, which deletes the old set first.
- **Manifest.** Whoever finds every shard present (the main process of a
  torchrun job, the last independent part, or ``synesthesia shard --finalize``)
  merges the per-part timing reports and re-reads the set
  in shard order (re-hash, sample counts, flags, per-channel mean/std of the
  train latents in float64) and writes ``manifest.json`` last, atomically, only
  when every shard exists. It holds no timings or paths, so it is
  byte-identical however often the run was interrupted; throughput (per shard
  and total, read / infer / decode / write seconds) is logged and written to
  ``throughput.json``, named by the manifest's ``extra.throughput``.
- **Bad input.** A sample whose ``preprocess`` raises ``SchemaError``
  (``bad_input``) or whose latent holds NaN/inf after the cast to the storage
  dtype (``nonfinite_latent``) keeps its key (the reader needs every source key
  in every sidecar) with an all-zero latent and a ``<modality>.flag.txt`` field
  holding the reason; the manifest lists them in ``extra.flagged`` and counts
  them in ``extra.flag_counts``, and they are left out of the channel stats.
  ``shard.on_error: raise`` fails the shard instead. A source shard that cannot
  be read or fails its sha256 fails with an error naming it; the other shards
  complete, the run exits non-zero and no manifest is written.
- **GPU path.** ``Generator.setup``: bf16 (or fp16 where bf16 is missing)
  autocast with ``precision: auto``, channels_last model (and, here, 4-D
  inputs; ``channels_last: false`` turns both off), xformers attention for
  diffusers models when installed, else PyTorch SDPA; pinned memory and
  non-blocking copies. fp32 on CPU.

Modules, in the order a run uses them:

==============  ========================================================================
``runner``      :func:`run_stage_one` and one generator's four steps; the results
``runtime``     the ``shard.*`` checks; joining the distributed job, device and precision
``paths``       set names, ``source/``, ``latents/<set>/``, ``decoded/<set>/``, file names
``generator``   build a generator from config, set it up on the device, its storage dtype
``cache``       the cache key: resume, replace (``--overwrite``) or refuse a set folder
``assignment``  the shards to do, in order, and which part takes which
``leases``      one job's shard leases: exclusive claim, heartbeat, stale takeover
``data``        DataLoader side: source shard → hashed, preprocessed per-shard batches
``set_runner``  :class:`SetRunner`: the batch loop of one generator on one process
``writer``      the writer thread's job: a finished shard → npy samples → atomic tar
``finish``      part reports; merged timings and manifests once every shard exists
``finalize``    channel statistics, merged timings and the manifest of a finished set
==============  ========================================================================

Everything listed in ``__all__`` is importable from ``synesthesia.stage_one``.
"""

from synesthesia.stage_one.assignment import source_tasks
from synesthesia.stage_one.generator import build_generator, prepare_generator, storage_dtype
from synesthesia.stage_one.paths import decoded_dir, flag_field, latent_dir, set_name, source_dir
from synesthesia.stage_one.runner import (
    SetResult,
    StageOneIncomplete,
    StageOneResult,
    finalize_stage_one,
    run_stage_one,
)
from synesthesia.stage_one.runtime import Runtime, resolve_runtime, validate
from synesthesia.stage_one.set_runner import SetRunner

__all__ = [
    "Runtime",
    "SetResult",
    "SetRunner",
    "StageOneIncomplete",
    "StageOneResult",
    "build_generator",
    "decoded_dir",
    "finalize_stage_one",
    "flag_field",
    "latent_dir",
    "prepare_generator",
    "resolve_runtime",
    "run_stage_one",
    "set_name",
    "source_dir",
    "source_tasks",
    "storage_dtype",
    "validate",
]
