"""The root of every config file: one section per layer, each owned by the code that uses it."""

from __future__ import annotations

from dataclasses import dataclass, field

from sat_video.data.config import DataConfig
from sat_video.diffusion.config import DiffusionConfig, SampleConfig
from sat_video.model.config import DiTConfig, FirstStageConfig, TextEncoderConfig
from sat_video.training.config import DeepSpeedConfig, ParallelConfig, TrainConfig
from sat_video.vae_training.config import VaeTrainingConfig


@dataclass
class ModelConfig:
    dit: DiTConfig = field(default_factory=DiTConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    first_stage: FirstStageConfig = field(default_factory=FirstStageConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)


@dataclass
class Config:
    """The root of every config file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    vae: VaeTrainingConfig = field(default_factory=VaeTrainingConfig)
    """Read by ``tools/train_vae.py`` only."""
