"""The pipeline's config sections: one frozen dataclass each, their fields the YAML keys.

``PipelineConfig`` holds them all: ``scenes`` (the procedural dataset), ``ingest``
(user data), ``shard`` and its ``generators`` (stage one), ``bootstrap``,
``teacher``, ``student``, ``method``, ``train`` (stage two) and ``ablate``.
Each field's comment says what it does; checks that need more than a type live
with the verb that reads the section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ScenesConfig:
    """The procedural scenes dataset (`synesthesia render`)."""

    num_train: int = 2000
    num_val: int = 400
    num_test: int = 400
    num_paired: int = 2000
    image_size: int = 64
    lidar_beams: int = 32
    lidar_azimuth: int = 256
    audio_rate: int = 16000
    audio_seconds: float = 0.5
    # How much of the label (true size x material) RGB hides, in [0, 1]. Size: everything but
    # the target is scaled by (L / 0.6 m)^ambiguity, so apparent size goes as L^(1 - ambiguity);
    # material: colours are mixed with a draw shared by all materials in this proportion
    # (0: colour and scale tell the label; 1: RGB holds neither). See sources/scenes/scene.py.
    ambiguity: float = 0.4
    clutter: int = 3  # at most this many background objects (1..clutter per scene)
    lidar_dropout: float = 0.05  # probability a return is lost (x3 on dark surfaces)
    lidar_noise: float = 0.02  # range noise sigma in metres (+ 0.2 % of the range)
    lidar_max_range: float = 80.0  # metres; farther returns read 0 (no return)
    shard_size: int = 500
    workers: int = 0  # 0: one process per core


@dataclass(frozen=True)
class IngestConfig:
    """Importing an existing dataset (`synesthesia ingest`)."""

    source: str = ""  # image folder, .tar path / brace pattern / folder of tars, saved HF dataset or parquet
    format: str = "auto"  # auto | folder | webdataset | hf
    val_fraction: float = 0.1  # of train, when the source has no val split
    test_fraction: float = 0.1  # of train, when the source has no test split
    shard_size: int = 1000
    audio_rate: int = 16000  # audio is resampled to this rate and stored as 16-bit FLAC
    image_field: str = "auto"  # webdataset field / HF column holding the image
    label_field: str = "auto"  # webdataset field / HF column holding the label
    lidar_beams: int = 64  # range image rows for KITTI .bin scans
    lidar_azimuth: int = 1024  # range image columns for KITTI .bin scans
    lidar_fov_up: float = 3.0  # degrees (HDL-64E)
    lidar_fov_down: float = -25.0  # degrees (HDL-64E)


@dataclass(frozen=True)
class GeneratorConfig:
    """One frozen generator run by stage one; ``options`` go to its constructor."""

    name: str = "tae"
    modality: str = "depth"
    weights: str | None = None
    set_name: str | None = None  # sidecar folder name; default "<name>-<modality>"
    samples_per_input: int = 1
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ShardConfig:
    """Stage one (`synesthesia shard`): source shards → latent sidecars."""

    generators: list[GeneratorConfig] = field(default_factory=list)
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    batch_size: int = 32
    num_workers: int = 1
    decode: bool = False
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    # auto: the generator's LatentSpec.dtype (float16 by default); float16 | float32 override float latents
    # (codes always keep their integer dtype)
    latent_dtype: str = "auto"
    on_error: str = "skip"  # skip | raise (bad input samples / NaN latents: flagged and counted, or fail)
    channels_last: bool = True  # CUDA only: model and 4-D inputs in channels_last memory format
    max_pending_writes: int = 2  # shards queued for the background writer before inference waits
    # a shard lease (stage_one/leases.py) whose heartbeat is older than this many seconds belongs to a
    # dead job and is taken over; the holder refreshes it every lease_timeout_s / 4
    lease_timeout_s: float = 600.0


@dataclass(frozen=True)
class BootstrapConfig:
    """Training small image-conditioned latent diffusion generators (`synesthesia bootstrap`).

    One model per modality, saved to ``<out>/<name or dataset>-<modality>/``; see models/README.md.
    """

    modalities: list[str] = field(default_factory=lambda: ["depth", "audio", "lidar"])
    out: str = "models"  # root of the model folders (the CLI's --out overrides it)
    name: str = ""  # model folder prefix; "" -> the pipeline's dataset name
    shards: str = "shards"  # root holding <dataset>/source (the CLI's --shards overrides it)
    split: str = "paired"  # paired RGB+signal split to train on; the last `holdout` pairs are held out
    holdout: int = 200
    max_pairs: int = 0  # 0: all pairs of the split
    vae: str = "tae"  # the frozen autoencoder of RGB and targets: tae (TAEF2)
    vae_weights: str | None = None
    mapping: dict[str, dict[str, Any]] = field(default_factory=dict)  # modality -> mappings options
    scheduler: str = "ddim"  # ddim | flow (flow matching, Euler)
    prediction_type: str = "sample"  # ddim: sample | epsilon | v_prediction; flow: ignored (velocity)
    timestep_sampling: str = "uniform"  # uniform | inference (train only at the few inference timesteps)
    num_train_timesteps: int = 1000
    inference_steps: int = 2
    ensemble: int = 1  # N seeded samples averaged into each stage-one latent (Marigold test-time ensembling)
    steps: int = 2000
    regression_steps: int = -1  # -1: same as steps
    batch_size: int = 32
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 50
    clip_grad: float = 1.0
    block_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    norm_groups: int = 8
    attention: bool = False  # self-attention in the lowest-resolution block
    precision: str = "no"  # no | bf16 | fp16 (accelerate mixed precision)
    device: str = "auto"  # auto | cpu | cuda
    encode_batch_size: int = 64
    work_dir: str = "runs/bootstrap"  # checkpoints and tracker logs (git-ignored)
    save_every: int = 500  # steps between checkpoints; 0: none
    resume: bool = True  # resume from the latest checkpoint of an identical run
    log_every: int = 50
    log_with: str = ""  # an accelerate tracker (tensorboard, wandb, ...) or "" for none
    max_model_mb: float = 5.0  # a saved model over this size is an error
    seed: int = 0


@dataclass(frozen=True)
class TeacherConfig:
    """The multimodal ViT over RGB patches and latent tokens."""

    dim: int = 192
    depth: int = 6
    heads: int = 3
    mlp_ratio: float = 4.0
    patch_size: int = 8
    tokens_per_modality: int = 16  # the resampler's fixed token budget per modality
    modality_dropout: float = 0.5  # p of replacing a modality's tokens by its null tokens (training)
    adapter_dropout: float = 0.1
    drop_path: float = 0.0
    latent_patch_size: int = 1  # spatial latents: p×p latent pixels per token
    resampler_depth: int = 0  # latent self-attention blocks after the resampler's cross-attention
    resampler_mlp_ratio: float = 2.0
    decoded_max_tokens: int = 256  # decoded raw signals: stride-2 convs until at most this many tokens
    epochs: int = 0  # training length of train.stage=teacher runs; 0: train.epochs (teachers often need more)


@dataclass(frozen=True)
class StudentConfig:
    """An RGB-only timm backbone."""

    name: str = "vit_tiny_scenes"
    pretrained: bool = False
    drop_path: float = 0.0


@dataclass(frozen=True)
class MethodConfig:
    """A training objective from the methods registry; ``options`` go to its constructor."""

    name: str = "ce"
    alpha: float = 0.25  # weight of CE; (1 - alpha) weights the distillation KL
    temperature: float = 2.0
    weight: float | None = None  # feature-term weight; None: the method's default (messy 1, hallucination 10)
    layers: list[int] = field(default_factory=lambda: [-3, -2, -1])  # student blocks; negative from the end
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    """Stage two (`synesthesia train`): the accelerate loop."""

    stage: str = "student"  # teacher | student
    modalities: list[str] = field(default_factory=lambda: ["depth", "audio", "lidar"])
    source: str = "latent"  # none | latent | decoded | real
    # source=decoded only: read stage one's decoded sidecars (decoded/<set>/, written with
    # shard.decode: true) | decode the latent set (latents/<set>/) on the fly, batch by batch
    decoded_from: str = "sidecars"  # sidecars | latents
    latent_sets: dict[str, str] = field(default_factory=dict)  # modality -> sidecar set name
    teacher: str | None = None  # path of a trained teacher run (student stage)
    epochs: int = 10  # the most epochs a run trains (the cosine schedule spans them)
    # stop when val accuracy has not improved for this many epochs (0: never); the weights
    # selected on val are the ones kept and tested either way
    early_stop_patience: int = 0
    # epochs trained before the patience may end a run (Keras' start_from_epoch, Lightning's
    # min_epochs): a run still at chance after a slow start is not stopped there
    early_stop_min_epochs: int = 0
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    grad_accum: int = 1
    clip_grad: float = 1.0
    # None: the launcher's choice (accelerate launch --mixed_precision or accelerate config; else
    # no) | no | bf16 | fp16 (this one, whatever the launcher says)
    precision: str | None = None
    num_workers: int = 1
    shuffle_buffer: int = 1000
    save_every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept (0: all)
    log_with: str = "jsonl"  # jsonl (local, <run>/logs) | tensorboard | wandb | ... | comma-separated | none
    # per tracker named in log_with, the keyword arguments its run starts with (accelerate's
    # init_trackers init_kwargs), e.g. {wandb: {name: run-1, entity: me, tags: [kd]}}
    tracker_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # train images: aligned (random crop + flip, the image-aligned privileged inputs cropped and
    # flipped alike) | rgb (the RGB only) | none (the eval resize + centre crop); a legacy bool
    # reads as rgb (true) or none (false). See train/samples.py.
    augment: str | bool = "aligned"
    seed: int = 0
    shards: str = "shards"  # shard root: reads <shards>/<dataset>/source and its sidecars
    image_size: int = 0  # 0: the source manifest's extra.image_size, else the first image's size
    # run folder under <out>/<pipeline name>/; "": <stage or method>-<source>-s<seed>
    # (source=decoded with decoded_from=latents: <stage or method>-decoded-latents-s<seed>)
    run_name: str = ""
    on_error: str = "warn"  # bad samples: warn | skip | raise
    verify: str = "size"  # size (each shard's bytes and existence, when opened) | full (also sha256)
    record_keys: bool = False  # audit: write every sample key seen, per rank and epoch, to <run>/keys/
    device: str = "auto"  # auto (an accelerator if there is one, else CPU) | cpu | cuda


@dataclass(frozen=True)
class AblateConfig:
    """The ablation grid (`synesthesia ablate`): student method × privileged source × seed.

    ``kd`` is tuned: its α × T grid is trained at ``tune_seed`` per source and the setting
    with the best val accuracy is used for every seed (one setting each: no tuning). Other
    methods are tuned the same way over the values in ``tune`` (``{messy: {weight: [0.1, 1.0]}}``).
    """

    methods: list[str] = field(default_factory=lambda: ["ce", "kd", "messy"])
    sources: list[str] = field(default_factory=lambda: ["none", "decoded", "latent", "real"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # stage-one generators per privileged source; a source left out gets: latent -> shard.generators,
    # decoded -> shard.generators with shard.decode: true, real -> tae over each of train.modalities
    generators: dict[str, list[GeneratorConfig]] = field(default_factory=dict)
    # method-section fields per labelled method (``messy@w0.1: {weight: 0.1}``), in place of the
    # pipeline's `method` fields of those names; a labelled kd trains with its own α and T (not tuned)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    kd_alphas: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7])
    kd_temperatures: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    # numeric method-section fields (alpha, temperature, weight) tuned like KD's α × T, per method
    # of `methods` other than ce and kd: {messy: {weight: [0.1, 1.0]}}
    tune: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    tune_seed: int | None = None  # the seed the tuning runs train at; None: the first of seeds
    teacher_overrides: list[str] = field(default_factory=list)  # e.g. [train.epochs=6] for the teachers only


@dataclass(frozen=True)
class PipelineConfig:
    """A whole pipeline: every verb reads the sections it needs."""

    name: str = "pipeline"
    dataset: str = "scenes"
    seed: int = 0
    scenes: ScenesConfig = field(default_factory=ScenesConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ablate: AblateConfig = field(default_factory=AblateConfig)
