"""Progressive training in one run: ``train.stages`` splits the run into periods that switch data (and the learning
rate) at iteration boundaries.

Each entry of ``train.stages`` is ``{until: <iteration>, set: {dotted.key: value}}`` and makes one period: the run's
config with that ``set`` applied (periods do not accumulate), training the iterations after the previous period's
``until`` up to and including its own; the last period ends at ``train.train_iters``. Only what can change without
rebuilding the model or the engine may be set (:data:`PERIOD_KEYS`); anything else is refused when the config loads.
Messages name the config's entries (``train.stages[1]``), as users write them.

The learning rate: when no period sets ``train.optimizer.lr`` or ``train.lr_schedule.warmup_iters``, the run's schedule
spans the whole run as without periods; when one does, every period runs the schedule's shape (``decay_style``,
``min_lr``) over its own iterations, with its own peak LR and warm-up.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sat_video.common.errors import ConfigError, did_you_mean
from sat_video.training.config import ScheduleConfig
from sat_video.training.optim import lr_lambda

PERIOD_KEYS = (
    "data.sources", "data.shards", "data.shuffle_buffer", "data.buckets", "data.bucket_weights", "data.max_upscale",
    "data.fps", "data.skip_frames", "data.min_frames", "data.height", "data.width", "train.micro_batch_size",
    "train.optimizer.lr", "train.lr_schedule.warmup_iters",
)
"""What a period may set: the data and its batch, the peak LR and warm-up. The model, the frozen stages, DeepSpeed and
the latent cache are built once per run."""
LR_KEYS = ("train.optimizer.lr", "train.lr_schedule.warmup_iters")


@dataclass(frozen=True)
class TrainingPeriod:
    """Iterations ``(start, until]`` (1-based) trained with ``cfg``: entry ``index`` of ``train.stages``."""

    index: int
    start: int
    until: int
    cfg: DictConfig


def plan_periods(cfg: DictConfig) -> list[TrainingPeriod]:
    """The periods of ``cfg`` (one spanning the run when ``train.stages`` is empty), each with its own config.

    Raises:
        ConfigError: a key that cannot change mid-run, boundaries out of order or not ending at ``train.train_iters``,
            naming the ``train.stages`` entry and the key.
    """
    periods, start = [], 0
    for index, stage in enumerate(cfg.train.stages):
        where = f"train.stages[{index}]"
        if not start < stage.until <= cfg.train.train_iters:
            raise ConfigError(f"{where}.until={stage.until}: stages must end in increasing order after iteration {start} "
                              f"and by train.train_iters={cfg.train.train_iters}")
        for key in stage.set:
            if key not in PERIOD_KEYS:
                raise ConfigError(f"{where}.set: '{key}' cannot change in the middle of a run{did_you_mean(key, PERIOD_KEYS)}"
                                  f" (a stage may set: {', '.join(PERIOD_KEYS)})")
        period_cfg = cfg.copy()
        for key, value in stage.set.items():
            try:
                OmegaConf.update(period_cfg, key, value, merge=False)
            except OmegaConfBaseException as err:
                raise ConfigError(f"{where}.set.{key}: {str(getattr(err, 'msg', err)).splitlines()[0]}") from None
        periods.append(TrainingPeriod(index, start, stage.until, period_cfg))
        start = stage.until
    if not periods:
        return [TrainingPeriod(0, 0, cfg.train.train_iters, cfg)]
    if start != cfg.train.train_iters:
        raise ConfigError(f"train.stages: the last stage ends at iteration {start}, train.train_iters is "
                          f"{cfg.train.train_iters}; make the last stage's until equal it")
    return periods


def period_of(periods: list[TrainingPeriod], iteration: int) -> TrainingPeriod:
    """The period that trains 1-based ``iteration``."""
    return next(period for period in periods if iteration <= period.until)


def lr_lambda_by_period(cfg: DictConfig, periods: list[TrainingPeriod]):
    """Multiplier of ``train.optimizer.lr`` at 0-based step ``it`` (LambdaLR's argument), per the module docstring."""
    base_lr = cfg.train.optimizer.lr
    schedule: ScheduleConfig = OmegaConf.to_object(cfg.train.lr_schedule)
    if not any(key in stage.set for stage in cfg.train.stages for key in LR_KEYS):
        return lr_lambda(schedule, base_lr, cfg.train.train_iters)
    parts = []
    for period in periods:
        period_schedule = OmegaConf.to_object(period.cfg.train.lr_schedule)
        period_schedule.decay_iters = None  # the period's own length
        lr = period.cfg.train.optimizer.lr
        try:
            parts.append((period, lr / base_lr, lr_lambda(period_schedule, lr, period.until - period.start)))
        except ConfigError as err:
            raise ConfigError(f"train.stages[{period.index}]: {err}") from None

    def multiplier(it: int) -> float:
        period, scale, inner = next((part for part in parts if it < part[0].until), parts[-1])
        return scale * inner(it - period.start)

    return multiplier
