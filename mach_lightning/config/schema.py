"""The base config schema: one dataclass per section, with every setting's default and meaning.

These are the sections every run reads. Each method's own settings (`delayed`, `local`, `synth`,
`mach`) are declared next to the method (mach_lightning/methods/) and registered with it;
`load_config` composes the two (config/sections.py). `configs/default.yaml` repeats the composed
defaults with the same comments (a test keeps them equal); loading and validation are in
`mach_lightning/config/__init__.py`, which re-exports these classes. Imports nothing of
mach_lightning: config is the bottom layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    backbone: str = "mlp"  # mlp | cnn | resnet
    num_components: int = 1  # K: the backbone is split into K components
    width: int = 512  # MLP hidden width
    depth: int = 2  # MLP hidden layers before the embedding layer
    embedding_dim: int = 128  # width of the last hidden layer (the embedding)
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # CNN/ResNet stage widths


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    scheduler: str = "none"  # none | cosine | step
    step_size: int = 10  # epochs between decays for scheduler=step
    gamma: float = 0.1  # decay factor for scheduler=step


@dataclass
class DataConfig:
    name: str = "digits"  # digits | mnist | fashion_mnist | cifar10
    root: str = "data"  # folder holding the dataset files
    batch_size: int = 128
    eval_batch_size: int = 1024
    val_fraction: float = 0.1  # share of the training set held out for validation
    normalize: bool = True  # standardise with the training set's mean and std
    download: bool = True  # download missing files when a network is reachable
    verify: bool = True  # check file checksums before use


@dataclass
class TopologyConfig:
    name: str = "sync"  # a registered topology: see `python -m mach_lightning.fit --list`
    # Each topology's own settings are in its section (delayed, local, synth, mach), registered
    # with it in mach_lightning/methods/.


@dataclass
class StalenessConfig:
    schedule: str = "pipeline"  # constant | pipeline | list | uniform | geometric | straggler
    k: int = 1  # constant: every component's delay in batch steps
    delays: list[int] = field(default_factory=list)  # list: one delay per component
    cap: int = 4  # uniform/geometric: largest delay drawn (bounds the in-flight memory)
    p: float = 0.5  # geometric: P(delay = d) is p * (1 - p)^d, clipped at cap
    seed: int | None = None  # seed of the random schedules; null: the run's seed
    straggler_component: int = 0  # straggler: index of the slowed component
    straggler_factor: float = 2.0  # straggler: how many times slower that component is


@dataclass
class DiagnosticsConfig:
    cosine_every_n_steps: int = 100  # cosine of applied vs true sync gradient each N steps; 0 off


@dataclass
class SimTimeConfig:
    enabled: bool = True  # log time/sim_step_ms and time/sim_elapsed_s (one component per device)
    # measured: timed on this machine (torch.utils.benchmark) | flops: FLOPs / flops_per_s, the
    # same in every run of a config (for reports that must reproduce)
    cost: str = "measured"
    flops_per_s: float = 5e10  # cost=flops: the simulated devices' rate, FLOP/s
    # cost=measured: re-time every N batch steps, the estimate being the median of all timings so
    # far, so one spoilt by a busy machine is outvoted (0: time the first batch only)
    remeasure_every_n_steps: int = 5000
    measure_reps: int = 20  # short timed rounds per measurement, all components in turn; the
    # fastest counts (other processes only ever add time)
    measure_threads: int = 1  # torch threads while timing, restored after (0: as training's)
    # cost=measured: time each component's optimizer step too (on copies of its parameters), as
    # a real device takes it; off: forward and backward only, as simulated times so far were
    optimizer_step: bool = False
    link_latency_us: float = 10.0  # latency of one message between devices, microseconds
    link_bandwidth_gbs: float = 16.0  # link bandwidth between devices, GB/s


@dataclass
class RuntimeConfig:
    # sim: every component in this one process on one clock (the simulator) | dist: one process
    # per component on this machine, talking over torch.distributed (gloo), plus a coordinator
    name: str = "sim"
    # dist: lockstep (each node waits for exactly what the simulator's schedule prescribes: the
    # same maths as sim, step for step) | free (nobody waits longer than its method requires;
    # every method; staleness is measured, not scheduled)
    mode: str = "lockstep"
    # dni/cdni: component (each synthesizer in its component's node and process) | oracle (each
    # synthesizer a node of its own, between its component and the next: in dist, its own process)
    synthesizer: str = "component"
    queue: int = 2  # free: sends in flight per link before a sender waits for its receiver
    # dist: per process, milliseconds slept each step (a straggler on purpose); [] for none
    sleep_ms: list[float] = field(default_factory=list)
    timeout_s: float = 60.0  # dist: a process silent this long is named, and the run stops
    host: str = "127.0.0.1"  # dist: the address of the coordinator's store
    port: int = 0  # dist: the store's TCP port (0: any free one)


@dataclass
class TrainerConfig:
    max_epochs: int = 20
    max_steps: int = -1  # batch steps (not optimizer steps); -1 means no limit
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: Any = "auto"  # auto, a device count (-1: all), or GPU indices: [0, 1] or "0,1"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn | fsdp ... (Lightning's registered names)
    precision: str = "32-true"  # 32-true | 64-true | bf16-mixed | 16-mixed | bf16-true ...
    deterministic: bool = False  # torch deterministic algorithms (slower, exact repeats)
    limit_train_batches: float = 1.0  # fraction (<=1.0) or number of batches per epoch
    limit_val_batches: float = 1.0
    check_val_every_n_epoch: int = 1
    log_every_n_steps: int = 20  # batch steps between logged training metrics
    progress_bar: bool = True
    lean_steps: bool = True  # direct backward/steps when Lightning's would only pass through
    test_after_fit: bool = True  # evaluate on the test split when training ends
    # Stop as diverged when the logged train/loss is non-finite or exceeds this many times the
    # first batch's loss (0: only a non-finite loss stops the run)
    divergence_factor: float = 100.0


@dataclass
class RunConfig:
    root: str = "runs"  # run directories go to <root>/<name>/<id>
    id: str | None = None  # defaults to a timestamp; fixed ids make resumable runs
    checkpoint_every_n_steps: int = 0  # also save last.ckpt every N batch steps (0: epoch ends)
    slurm_job_id: str | None = None  # set by the Slurm launcher; recorded in W&B's config
    monitor: str = "val/acc"  # metric that picks the best checkpoint
    monitor_mode: str = "max"  # max | min


@dataclass
class WandbConfig:
    enabled: bool = True
    mode: str = "auto"  # auto (offline without API key or network) | online | offline
    project: str = "mach_lightning"
    entity: str | None = None
    group: str | None = None
    job_type: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class TensorBoardConfig:
    enabled: bool = False  # also write TensorBoard event files to <run_dir>/tensorboard/


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)


@dataclass
class Config:
    name: str = "default"  # run name: the run directory is <run.root>/<name>/<id>
    seed: int = 0  # seeds python, numpy, torch and the data order
    resume: bool = False  # continue the latest run of this name from its last.ckpt
    ckpt_path: str | None = None  # or continue from this checkpoint
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    simtime: SimTimeConfig = field(default_factory=SimTimeConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
