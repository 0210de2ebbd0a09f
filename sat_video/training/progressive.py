"""Progressive training in one run: ``train.stages`` switches data (and the learning rate) at iteration boundaries.

Each stage is ``{until: <iteration>, set: {dotted.key: value}}``: the stage's config is the run's config with its
``set`` applied (stages do not accumulate), and it trains the iterations after the previous stage's ``until`` up to
and including its own; the last stage ends at ``train.train_iters``. Only what can change without rebuilding the
model or the engine may be set (:data:`STAGE_KEYS`); anything else is refused when the config loads.

The learning rate: when no stage sets ``train.optimizer.lr`` or ``train.lr_schedule.warmup_iters``, the run's schedule
spans the whole run as without stages; when one does, every stage runs the schedule's shape (``decay_style``,
``min_lr``) over its own iterations, with its own peak LR and warm-up.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sat_video.common.errors import ConfigError, did_you_mean
from sat_video.training.config import ScheduleConfig
from sat_video.training.optim import lr_lambda

STAGE_KEYS = (
    "data.sources", "data.buckets", "data.bucket_weights", "data.max_upscale", "data.fps", "data.skip_frames",
    "data.min_frames", "data.height", "data.width", "train.micro_batch_size", "train.optimizer.lr",
    "train.lr_schedule.warmup_iters",
)
"""What a stage may set: the data and its batch, the peak LR and warm-up. The model, the frozen stages, DeepSpeed and
the latent cache are built once per run."""
LR_KEYS = ("train.optimizer.lr", "train.lr_schedule.warmup_iters")


@dataclass(frozen=True)
class TrainingStage:
    """Iterations ``(start, until]`` (1-based) trained with ``cfg``."""

    index: int
    start: int
    until: int
    cfg: DictConfig


def plan_stages(cfg: DictConfig) -> list[TrainingStage]:
    """The stages of ``cfg`` (one spanning the run when ``train.stages`` is empty), each with its own config.

    Raises:
        ConfigError: a key that cannot change mid-run, boundaries out of order or not ending at ``train.train_iters``,
            naming the stage and the key.
    """
    stages, start = [], 0
    for index, stage in enumerate(cfg.train.stages):
        where = f"train.stages[{index}]"
        if not start < stage.until <= cfg.train.train_iters:
            raise ConfigError(f"{where}.until={stage.until}: stages must end in increasing order after iteration {start} "
                              f"and by train.train_iters={cfg.train.train_iters}")
        for key in stage.set:
            if key not in STAGE_KEYS:
                raise ConfigError(f"{where}.set: '{key}' cannot change in the middle of a run{did_you_mean(key, STAGE_KEYS)}"
                                  f" (a stage may set: {', '.join(STAGE_KEYS)})")
        stage_cfg = cfg.copy()
        for key, value in stage.set.items():
            try:
                OmegaConf.update(stage_cfg, key, value, merge=False)
            except OmegaConfBaseException as err:
                raise ConfigError(f"{where}.set.{key}: {str(getattr(err, 'msg', err)).splitlines()[0]}") from None
        stages.append(TrainingStage(index, start, stage.until, stage_cfg))
        start = stage.until
    if not stages:
        return [TrainingStage(0, 0, cfg.train.train_iters, cfg)]
    if start != cfg.train.train_iters:
        raise ConfigError(f"train.stages: the last stage ends at iteration {start}, train.train_iters is "
                          f"{cfg.train.train_iters}; make the last stage's until equal it")
    return stages


def stage_of(stages: list[TrainingStage], iteration: int) -> TrainingStage:
    """The stage that trains 1-based ``iteration``."""
    return next(stage for stage in stages if iteration <= stage.until)


def staged_lr_lambda(cfg: DictConfig, stages: list[TrainingStage]):
    """Multiplier of ``train.optimizer.lr`` at 0-based step ``it`` (LambdaLR's argument), per the module docstring."""
    base_lr = cfg.train.optimizer.lr
    schedule: ScheduleConfig = OmegaConf.to_object(cfg.train.lr_schedule)
    if not any(key in stage_set for stage_set in (s.set for s in cfg.train.stages) for key in LR_KEYS):
        return lr_lambda(schedule, base_lr, cfg.train.train_iters)
    parts = []
    for stage in stages:
        stage_schedule = OmegaConf.to_object(stage.cfg.train.lr_schedule)
        stage_schedule.decay_iters = None  # the stage's own length
        lr = stage.cfg.train.optimizer.lr
        try:
            parts.append((stage, lr / base_lr, lr_lambda(stage_schedule, lr, stage.until - stage.start)))
        except ConfigError as err:
            raise ConfigError(f"train.stages[{stage.index}]: {err}") from None

    def multiplier(it: int) -> float:
        stage, scale, inner = next((part for part in parts if it < part[0].until), parts[-1])
        return scale * inner(it - stage.start)

    return multiplier
