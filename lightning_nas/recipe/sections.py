"""The typed schema of a recipe's top level and of its plain settings sections.

These dataclasses are read by recipe validation (from source, see :mod:`.signature`) and used
as-is at run time. A stage that needs a new top-level section adds a field here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .markers import (
    ClassPathSpec,
    DataSpec,
    ExistingFile,
    LoggerName,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SpaceSpec,
    TaskSpec,
    TrainerArgs,
)

if TYPE_CHECKING:
    from .profile_settings import ProfileSettings
    from .search_settings import SearchSettings


@dataclass
class WandbSettings:
    """Options of the Weights & Biases logger (``logger: wandb``)."""

    project: str = "lightning-nas"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    #: None: offline when ``WANDB_MODE=offline`` or no API key is configured; True/False forces it.
    offline: bool | None = None
    log_model: bool = False


@dataclass
class SweepSettings:
    """A W&B sweep over flat dotted recipe keys (``task.lr: {min: 0.01, max: 0.1}``)."""

    parameters: dict[str, dict[str, Any]]
    method: Literal["grid", "random", "bayes"] = "random"
    metric: dict[str, Any] | None = None
    name: str | None = None
    early_terminate: dict[str, Any] | None = None
    run_cap: int | None = None
    #: ``--local``: the sweep's directory (trials, table, figures); default ``runs/sweeps/<name>``,
    #: the name defaulting to ``<recipe name>-sweep`` (also the W&B group of its runs).
    run_dir: str | None = None


@dataclass
class ExportSettings:
    """``lightning-nas export``: a subnet of a trained supernet as a standalone network."""

    #: A checkpoint written by ``lightning-nas fit`` of a supernet recipe.
    checkpoint: ExistingFile
    #: A reference subnet's name (smallest, largest, random0, ...) or a config {ks, e, d, r}.
    subnet: str | dict[str, Any] = "largest"
    #: Recompute batch-norm statistics for the subnet on the recipe's held-out images (needs `data:`).
    recalibrate_bn: bool = True
    bn_recalibration_images: PositiveInt = 2000
    bn_recalibration_batch: PositiveInt = 200
    #: Also write an ONNX file.
    onnx: bool = False


@dataclass
class RankSettings:
    """``lightning-nas rank``: score NAS-Bench-201 architectures (higher = predicted better)."""

    #: A zero-cost proxy (synflow, nwot, ...) or a trained ParZC checkpoint.
    ranker: str
    #: A CSV with an ``ArchitectureString`` column; the output repeats its rows with a ``score``.
    archs: ExistingFile
    #: CIFAR-10 training arrays (``.npz``) the proxies take their batch from.
    data_path: ExistingFile
    #: Where to write; default ``<run_dir>/ranked.csv``.
    out: str | None = None
    batch_size: PositiveInt = 64
    seed: int | None = None
    #: Score only the first rows (smoke runs).
    limit: PositiveInt | None = None


@dataclass
class MQBenchSettings:
    """``lightning-nas mqbench``: a mixed-precision quantization benchmark (MQ-Bench style).

    Random per-layer weight-bit configurations of a trained network, each quantized post-training
    (per-channel clipping chosen by error, activations at ``activation_bits``, batch norm
    re-estimated on held-out training images) and evaluated on the data module's test images; the
    pairs go to a pair store (kind ``mq``), resumably. Also writes the per-layer statistics the
    proxies read (``stats.npz``) and the non-triviality check (``benchmark.json``).
    """

    #: The trained network, told apart by content: a checkpoint of ``lightning-nas fit`` of a
    #: classification recipe (e.g. resnet20_cifar10), or a ``subnet.pt`` of ``lightning-nas export``
    #: (e.g. the largest subnet of the CIFAR-10 supernet, recipes/ofa_export_cifar10.yaml), whose
    #: images are resized to the subnet's resolution.
    checkpoint: ExistingFile
    #: Layers whose weight bits a configuration chooses; default: the model's ``block_layers()``
    #: (ResNet: the block convolutions; OFA subnet: every convolution of its blocks, squeeze-excite
    #: included).
    layers: list[str] | None = None
    bit_choices: list[int] = field(default_factory=lambda: [2, 3, 4])
    activation_bits: int = 8
    #: Bits of every other conv / linear layer (stem, classifier).
    fixed_bits: int = 8
    num_configs: int = 425
    seed: int = 0
    #: Held-out training images for activation calibration and batch-norm re-estimation.
    bn_images: int = 1024
    #: Learned (AdaRound-style) rounding steps per (layer, bit width), 0 = nearest rounding; on the
    #: float inputs of the first ``rounding_images`` calibration images, once per (layer, bits).
    rounding_steps: int = 0
    rounding_images: int = 256
    batch_size: int = 500
    #: The pair store; default ``<run_dir>/pairs.sqlite``.
    store: str | None = None
    #: Images of the one batch the statistics are computed on, and of the activations kept.
    stats_images: int = 64
    activation_images: int = 4
    hessian_samples: int = 32
    progress: bool = True


@dataclass
class SpaceEvoProfileSettings:
    """``profile.spaceevo``: time sampled sub-stages of the SpaceEvo cells in int8 instead of a
    space's units (:mod:`lightning_nas.hardware.spaceevo_latency`); the profile's ``target``,
    ``int8_backend``, ``batch_size``, ``threads``, ``warmup``, ``repeats``, ``realtime``, ``limit``
    (rows), ``progress``, ``seed`` and ``output`` (default ``<run_dir>/spaceevo_latency.csv``) apply.
    """

    #: The macro layout: ``spaceevo_cifar`` or the fields of a MacroLayout.
    layout: str | dict[str, Any] = "spaceevo_cifar"
    #: Sub-stages timed per (stage, block type) cell, round-robin over the stage's widths.
    samples_per_cell: PositiveInt = 20
    #: Stage indices to time; default every stage of the layout.
    stages: list[NonNegativeInt] | None = None
    #: Block types to time; default every block type of the layout.
    block_types: list[str] | None = None


@dataclass
class EMQSearchSettings:
    """``lightning-nas emq``: evolve a proxy program on a benchmark and score every hand-made proxy."""

    #: ``stats.npz`` of an mqbench run.
    stats: ExistingFile
    #: Its pair store (pairs of kind ``mq``).
    store: ExistingFile
    generations: int = 1000
    population: int = 20
    chain_length: int = 2
    #: Share of the configurations the fitness uses; the rest is the held-out report.
    train_fraction: float = 0.5
    screen_configs: int = 20
    #: Evolutions from different seeds; the best on the training part is reported.
    restarts: int = 1
    seed: int | None = None
    progress: bool = True


@dataclass
class AllocateSettings:
    """``lightning-nas allocate``: bits per layer by an integer program for each proxy, checked by real PTQ."""

    #: ``stats.npz`` of the mqbench run (its PTQ settings are reused).
    stats: ExistingFile
    #: The same network's file: the classification checkpoint or ``subnet.pt`` the benchmark read.
    checkpoint: ExistingFile
    #: ``best_program.json`` of an emq run; needed by the proxy ``emq``.
    program: ExistingFile | None = None
    #: ``emq`` (the evolved program) and hand-made proxies (hawq_v3, ompq, snip, fisher, synflow, ...).
    proxies: list[str] = field(default_factory=lambda: ["emq", "hawq_v3", "ompq"])
    #: Budgets as parameter-weighted mean weight bits (``size``) or the BitOps of that uniform width.
    budgets: list[float] = field(default_factory=lambda: [2.5, 3.0, 3.5])
    budget_metric: Literal["size", "bitops"] = "size"
    #: Random feasible configurations per budget (the best by real top-1 is the baseline); 0: none.
    random_configs: int = 50
    uniform: bool = True
    batch_size: int = 500
    seed: int = 0
    progress: bool = True


@dataclass
class DistillSettings:
    """``lightning-nas distill``: SpaceEvo's quantization term, cell by cell.

    Every (stage, block type) cell's elastic stage learns the teacher's stage by block-wise
    distillation (sandwich rule, ``epochs`` in float, then ``qat_epochs`` of int8 QAT), then
    ``table_substages`` sampled sub-stages are scored (int8 fake-quantized normalised loss on the
    first ``table_images`` held-out images) into ``losses.csv``. Finished cells are skipped when
    the recipe runs again; a killed cell resumes its training from its last epoch checkpoint.
    """

    #: A once-for-all supernet checkpoint (``lightning-nas fit`` of ofa_supernet_cifar10): its
    #: largest subnet is the teacher.
    teacher: ExistingFile
    #: Stage indices of the layout to distil (default: all).
    stages: list[NonNegativeInt] | None = None
    #: Block types (default: every type of the layout).
    block_types: list[str] | None = None
    epochs: PositiveInt = 5
    #: Epochs of int8 QAT after the float epochs; 0 fake-quantizes after calibration only (PTQ).
    qat_epochs: NonNegativeInt = 1
    lr: PositiveFloat = 1.0e-3
    qat_lr: PositiveFloat = 1.0e-4
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    weight_decay: NonNegativeFloat = 0.0
    #: Random sub-stages per step besides the largest and the smallest.
    random_substages: NonNegativeInt = 2
    #: Sub-stages scored per cell (seeded, spread over every width of the stage).
    table_substages: PositiveInt = 300
    #: Held-out images the table's loss is measured on (the first ones of the held-out split).
    table_images: PositiveInt = 1000
    #: The next held-out images: activation-range calibration and per-sub-stage batch-norm
    #: re-estimation (0: no re-estimation).
    bn_images: NonNegativeInt = 500
    batch_size: PositiveInt = 250
    #: 7-bit weight codes, the grid of targets without VNNI.
    reduce_weight_range: bool = False
    seed: int = 0
    #: The table; default ``<run_dir>/losses.csv``.
    output: str | None = None
    progress: bool = True


@dataclass
class SpaceEvoSearchSettings:
    """The ``spaceevo:`` section, run by ``lightning-nas search``: SpaceEvo's aging evolution over
    spaces (per stage a block type and a width window), each scored by the Q-T score on the
    sub-stage tables (:mod:`lightning_nas.search.spaceevo`, :mod:`lightning_nas.stages.spaceevo_search`).

    Writes ``spaces.csv``, ``best_spaces.json`` and ``evolution.png`` into the run directory.
    """

    #: ``spaceevo_latency.csv`` of ``lightning-nas profile recipes/latency_lut_spaceevo.yaml`` (its
    #: ``.meta.json`` beside it). Checked when the stage starts (in a pipeline an earlier stage writes it).
    latency: str
    #: ``losses.csv`` of ``lightning-nas distill recipes/spaceevo_distill_cifar10.yaml``.
    losses: str
    #: The macro layout: ``spaceevo_cifar`` or the fields of a MacroLayout.
    layout: str | dict[str, Any] = "spaceevo_cifar"
    #: Latency budgets ``c`` (ms, whole subnet); exactly one of ``budgets_ms`` and ``budget_percentiles``.
    budgets_ms: list[PositiveFloat] | None = None
    #: Budgets at these percentiles (0-100) of the latency of random subnets of random spaces.
    budget_percentiles: list[PositiveFloat] | None = None
    #: Subnets ``N`` drawn per budget and space (reference 100,000).
    num_subnets: PositiveInt = 100000
    #: ``k``: the loss term ``L`` averages the ``k`` lowest losses under a budget (reference 50).
    best_subnets: PositiveInt = 50
    #: ``T = max(1, (t / p) ** a)`` (reference t = 0.08-0.1, a = 0.01).
    t: PositiveFloat = 0.1
    a: NonNegativeFloat = 0.01
    #: Latency of what the tables leave out (stem, head), added to every subnet; the latency
    #: table's ONNX Runtime call overhead (its meta ``overhead_ms``) is added on top. Default: the
    #: stem and the head at the last stage's largest width as the profile's self-validation timed
    #: them (meta ``fixed_ms``), else 0.
    fixed_latency_ms: NonNegativeFloat | None = None
    #: Aging evolution (reference 500 / 125 / 5,000): members kept, members drawn per cycle, spaces
    #: evaluated in all (homogeneous seeds and random fill included).
    population: PositiveInt = 500
    sample_size: PositiveInt = 125
    evaluations: PositiveInt = 5000
    #: Mutations tried per child before a child that is always a duplicate is replaced.
    max_retries: PositiveInt = 50
    #: Spaces listed in ``best_spaces.json``.
    top_k: PositiveInt = 10
    #: Default: the recipe's ``seed``.
    seed: int | None = None
    #: The deployment target searched for; the latency table must have been measured for it.
    target: Literal["auto", "auto/torch", "auto/onnxruntime", "x86_vnni/torch", "x86_avx2/torch",
                    "x86_vnni/onnxruntime", "x86_avx2/onnxruntime", "arm/torch"] = "auto"
    #: Use a latency table of another target anyway.
    allow_mixed_targets: bool = False
    progress: bool = True


@dataclass
class DeploySettings:
    """The deployment target, decided once per recipe (``lightning_nas.targets``), and with
    ``qat_subnet``, the settings of ``lightning-nas deploy``.

    Stage recipes hand the target to what depends on it (``task.target: ${deploy.target}``, the
    quantized pair collector, the latency profile, the search); a pipeline resolves ``auto`` once
    and gives every stage the same concrete target. A recipe whose section names ``qat_subnet`` is
    run by ``lightning-nas deploy`` (:mod:`lightning_nas.stages.deploy`): the subnet a QAT run
    finetuned is converted to int8 for the target, exported to ONNX, compared with its
    fake-quantized self and timed.
    """

    #: ``auto`` (this host's CPU kind, torch runtime), ``auto/onnxruntime``, or a concrete
    #: ``x86_vnni/torch``, ``x86_avx2/torch``, ``x86_vnni/onnxruntime``, ``x86_avx2/onnxruntime``,
    #: ``arm/torch``.
    # Written out (not the alias lightning_nas.targets.TargetName): recipe validation reads
    # annotations as source text; tests/test_targets.py keeps the two lists equal.
    target: Literal["auto", "auto/torch", "auto/onnxruntime", "x86_vnni/torch", "x86_avx2/torch",
                    "x86_vnni/onnxruntime", "x86_avx2/onnxruntime", "arm/torch"] = "auto"
    #: Let a stage combine artifacts of different targets (pairs, predictors, latency tables).
    allow_mixed_targets: bool = False
    #: ``lightning-nas deploy``: the ``qat_subnet.pt`` a QAT run (``task.name: qat``) wrote into its
    #: run directory when fit ended (or that directory). Checked when the stage starts, since in a
    #: pipeline the QAT stage before it writes the file.
    qat_subnet: str | None = None
    #: Test images the int8 / ONNX top-1 is compared on with the fake-quantized model (a stratified
    #: sample of the data's test split, the QAT run's ``test_images`` order).
    agreement_images: PositiveInt = 1000
    #: Held-out training images (and their batch size) that calibrate the int8 tensors no quantizer
    #: learned a range for (none for a subnet finetuned with ``task.fake_quantize_outputs``).
    calibration_images: PositiveInt = 2000
    calibration_batch: PositiveInt = 200
    #: The quantized engine of the torch conversion; default: the one the QAT run trained for
    #: (its ``task.int8_backend``, else the target's: ``onednn`` on x86, ``qnnpack`` on ARM).
    int8_backend: Literal["onednn", "x86", "fbgemm", "qnnpack"] | None = None
    #: Latency protocol: the median of ``latency_repeats`` calls after ``latency_warmup``, per
    #: batch size, at ``latency_threads`` intra-op threads.
    latency_batch_sizes: list[PositiveInt] = field(default_factory=lambda: [1, 32])
    latency_warmup: NonNegativeInt = 10
    latency_repeats: PositiveInt = 50
    latency_threads: PositiveInt = 1
    #: A rich progress bar over the deployment's steps.
    progress: bool = True


@dataclass
class PipelineStage:
    """One stage of a pipeline: a recipe, run by its own verb, with overrides of its keys."""

    #: Path of the stage's recipe, relative to the pipeline recipe's folder (or the working directory).
    recipe: str
    #: Edits of the stage's recipe, applied before its own smoke block.
    overrides: list[str] = field(default_factory=list)
    #: Applied after the stage's smoke block, like a command line's: what ``STAGE/key=value`` on the
    #: pipeline's command line (or in a sweep of it) sets.
    final_overrides: list[str] = field(default_factory=list)


@dataclass
class PipelineSettings:
    """``lightning-nas pipeline``: recipes run in order, chained through their run directories.

    Every stage gets ``vars.runs`` = the pipeline's ``run_dir``, so a later stage finds an earlier
    one's artifacts where its recipe looks for them (``${vars.runs}/ofa_supernet/...``). A stage
    whose run directory records a finished run of the same resolved recipe is reused, not rerun.
    """

    stages: list[PipelineStage]
    #: The image data of every stage that reads images (not the predictors' pair stores): an
    #: ``.npz`` file (x uint8 N x H x W x C, y int), an image folder with ``train/`` and ``val/``
    #: class folders, a YAML file holding a data section, or the section itself. The stages keep
    #: their batch sizes and held-out split; their spaces and tasks get its number of classes and
    #: its image size as their resolutions (``resolutions: [...]`` here chooses others).
    data: str | dict[str, Any] | None = None
    #: Run every stage with its own ``--smoke`` overrides.
    smoke: bool = False
    #: False reruns every stage even when a finished run of the same recipe is there.
    reuse: bool = True


@dataclass
class Recipe:
    """Top-level keys of every recipe; which ones a verb needs is checked by the verb."""

    #: One line shown by ``lightning-nas ls``.
    description: str
    #: Defaults to the recipe file's stem.
    name: str | None = None
    #: Where everything the run writes goes (resolved once, when the recipe is loaded).
    run_dir: str = "runs/${name}/${now:%Y%m%d-%H%M%S}"
    seed: int = 0
    task: TaskSpec | None = None
    data: DataSpec | None = None
    space: SpaceSpec | None = None
    trainer: TrainerArgs = field(default_factory=dict)
    #: Named Lightning callbacks; a preset's entry is switched off with ``~callbacks.NAME``.
    callbacks: dict[str, ClassPathSpec | None] = field(default_factory=dict)
    logger: LoggerName | list[LoggerName] | None = "csv"
    wandb: WandbSettings | None = None
    #: A checkpoint to resume from ("last" resumes from run_dir/checkpoints/last.ckpt).
    ckpt_path: ExistingFile | Literal["last"] | None = None
    #: Load checkpoints, predictors and subnets that need pickle (written by older versions or
    #: holding Python objects). Pickle runs code from the file: only for files you trust.
    allow_pickle: bool = False
    #: Overrides (``key=value``, ``~key``) that ``--smoke`` applies for a run of well under a minute.
    smoke: list[str] = field(default_factory=list)
    sweep: SweepSettings | None = None
    export: ExportSettings | None = None
    profile: ProfileSettings | None = None
    search: SearchSettings | None = None
    rank: RankSettings | None = None
    mqbench: MQBenchSettings | None = None
    emq: EMQSearchSettings | None = None
    allocate: AllocateSettings | None = None
    pipeline: PipelineSettings | None = None
    distill: DistillSettings | None = None
    #: The SpaceEvo space search (run by ``lightning-nas search``).
    spaceevo: SpaceEvoSearchSettings | None = None
    deploy: DeploySettings | None = None
    #: Free-form values for interpolation (``${vars.width}``); never read by the framework.
    vars: dict[str, Any] = field(default_factory=dict)
