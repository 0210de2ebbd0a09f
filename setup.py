from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="sat_video",
    version="0.1.0",
    description="SAT-style video diffusion transformers (CogVideoX) built from mixins",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # every subpackage: a plain (non-editable) install must hold the whole library
    packages=find_packages(include=["sat_video", "sat_video.*", "mixins", "mixins.*"]),
    install_requires=[
        "torch>=2.4",
        "einops",
        "omegaconf>=2.3",
        "numpy",
        "safetensors",
        "sentencepiece",
        "transformers",
        "diffusers>=0.32",
        "accelerate",
        "deepspeed",
        "decord",
        "imageio",
        "imageio-ffmpeg",
        "matplotlib",
        "pillow",
        "tensorboard",
        "tqdm",
        "webdataset>=1.0",  # the tar format of data.shards (tools/make_shards.py); brings braceexpand
        "braceexpand",
    ],
    # wandb: train.report_to=[wandb]; the tests run it offline
    extras_require={"wandb": ["wandb"], "test": ["pytest", "pytest-timeout", "peft", "wandb"],
                    "dev": ["pytest", "pytest-timeout", "peft", "wandb", "ruff==0.17.6"]},
)
