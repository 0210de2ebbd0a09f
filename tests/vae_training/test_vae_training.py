"""tools/train_vae.py end to end on a tiny CogVideoX VAE: it learns, keeps the encoder, the GAN path resumes exactly,
its output loads in diffusers and as a DiT's first stage, and SAT's layout round-trips."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mixins.video_vae import VideoVAEMixin, read_sat_state_dict
from sat_video import load_config
from sat_video.common.errors import ConfigError
from sat_video.data.clips import ClipSpec, load_clip
from sat_video.data.sources import discover
from sat_video.fixtures.synthetic import make_moving_shapes
from sat_video.formats.sat_checkpoint import MODEL_STATES
from sat_video.training.metrics import read_metrics
from sat_video.vae_training.autoencoder import TrainableAutoencoder, load_autoencoder
from sat_video.vae_training.discriminator import discriminator_from_state_dict
from sat_video.vae_training.lpips import lpips_from_files, random_lpips
from sat_video.vae_training.quality import psnr
from sat_video.vae_training.trainer import VaeTrainer, check_vae_run, train_vae
from tests.conftest import ROOT
from tests.numerics import assert_identical
from tests.training.runs import one_process_group, train_here
from tools.train_vae import main as train_vae_tool

VAE_BASE = [ROOT / "configs" / "vae" / "cogvideox_vae.yaml", ROOT / "configs" / "vae" / "tiny.yaml"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Moving shapes at 32x64 for training (one file broken, one without a label) and three held-out clips; random LPIPS
    weights in torchvision's and the lpips package's file layouts."""
    root = tmp_path_factory.mktemp("vae_clips")
    make_moving_shapes(root / "train", num_videos=8, num_frames=12, height=32, width=64, fps=8, seed=1)
    make_moving_shapes(root / "heldout", num_videos=3, num_frames=12, height=32, width=64, fps=8, seed=2)
    (root / "train" / "videos" / "broken.mp4").write_bytes(b"not a video")
    next((root / "train" / "labels").glob("*.txt")).unlink()  # a VAE needs no caption
    state = random_lpips(0).state_dict()  # net.slice<k>.<index>.weight is torchvision's features.<index>.weight
    torch.save({"features." + key.split(".", 2)[2]: value for key, value in state.items() if key.startswith("net.")}
               | {"classifier.0.weight": torch.zeros(2, 2)}, root / "vgg16.pth")
    torch.save({key: value for key, value in state.items() if key.startswith("lin")}, root / "lpips_vgg.pth")
    return root


def keys(clips, save, *overrides):
    return [f"data.sources=[{clips / 'train'}]", f"vae.eval_sources=[{clips / 'heldout'}]", f"train.save={save}",
            *overrides]


def vae_here(clips, save, *overrides):
    with one_process_group():
        return train_vae(load_config(VAE_BASE, keys(clips, save, *overrides)))


def heldout_psnr(vae_or_folder, clips) -> float:
    """Mean PSNR of the held-out clips through the posterior mean, computed here without the trainer."""
    cfg = load_config(VAE_BASE)
    vae = vae_or_folder if not isinstance(vae_or_folder, str) else VideoVAEMixin.from_config(
        load_config(VAE_BASE, [f"model.first_stage.path={vae_or_folder}"]).model.first_stage).vae
    model = TrainableAutoencoder(vae, "decoder").eval()
    spec = ClipSpec(cfg.model.dit.num_frames, cfg.data.height, cfg.data.width, fps=cfg.data.fps, skip_frames=0)
    values = []
    with torch.no_grad():
        for ref in discover([clips / "heldout"]):
            video = load_clip(ref, spec)[0][None]
            values.append(float(psnr(model(video, sample=False).video.clamp(-1, 1), video)))
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def decoder_run(clips, tmp_path_factory):
    """30 steps of decoder fine-tuning from random weights."""
    save = tmp_path_factory.mktemp("vae_runs") / "decoder"
    vae_here(clips, save, "train.train_iters=30", "train.save_interval=30", "train.eval.interval=15")
    return save


@pytest.mark.slow
def test_decoder_fine_tuning_learns_and_keeps_the_encoder(clips, decoder_run):
    from diffusers import AutoencoderKLCogVideoX

    initial, _ = load_autoencoder(load_config(VAE_BASE).model.first_stage)
    before = heldout_psnr(initial, clips)
    records = read_metrics(decoder_run)
    evaluations = [r for r in records if "eval_psnr" in r]
    assert [r["step"] for r in evaluations] == [15, 30]
    assert evaluations[-1]["eval_psnr"] >= before + 2.0, (before, evaluations)
    assert 0 < evaluations[-1]["eval_ssim"] <= 1 and evaluations[-1]["eval_samples"] == 3
    assert "eval_lpips" not in evaluations[-1]  # no LPIPS weights in this run
    # the trainer's figure is the one computed here from the saved folder
    assert heldout_psnr(str(decoder_run / "30" / "vae"), clips) == pytest.approx(evaluations[-1]["eval_psnr"], rel=1e-4)
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 30 and steps[-1]["pixel_loss"] < steps[0]["pixel_loss"] and "kl_loss" not in steps[-1]

    trained = AutoencoderKLCogVideoX.from_pretrained(decoder_run / "30" / "vae")
    initial_state, trained_state = initial.state_dict(), trained.state_dict()
    for name in initial_state:
        if name.startswith(("encoder.", "quant_conv.")):
            assert_identical(trained_state[name], initial_state[name], name)
    assert any(not torch.equal(trained_state[n], initial_state[n]) for n in initial_state if n.startswith("decoder."))

    skipped = (decoder_run / "skipped_files.txt").read_text()
    assert "broken.mp4" in skipped and len(skipped.splitlines()) == 1  # the clip without a label trained
    assert (decoder_run / "samples" / "30" / "reconstruction.png").is_file()


@pytest.mark.slow
def test_the_trained_folder_is_a_dits_first_stage(decoder_run, train_assets, tmp_path):
    state = train_here(train_assets, tmp_path / "dit", f"model.first_stage.path={decoder_run / '30' / 'vae'}",
                       "train.train_iters=2", "data.cache_latents=false")
    assert state.iteration == 2


GAN = ("vae.loss.adversarial_weight=0.5", "vae.loss.disc_start=3", "vae.loss.r1_weight=1.0", "vae.loss.perceptual_weight=0.5",
       "vae.crop=[32,32]", "vae.trainable=all", "deepspeed.zero_stage=2",
       "vae.discriminator.lr=1e-3", "train.save_interval=2", "train.eval.interval=3")


def lpips_files(clips):
    return [f"vae.lpips.vgg16={clips / 'vgg16.pth'}", f"vae.lpips.heads={clips / 'lpips_vgg.pth'}"]


@pytest.mark.slow
def test_gan_training_resumes_exactly_across_disc_start(clips, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    vae_here(clips, straight, *GAN, *lpips_files(clips), "train.train_iters=6")
    for until in (2, 4, 6):  # stopped before the discriminator starts, then once it trains
        vae_here(clips, resumed, *GAN, *lpips_files(clips), f"train.train_iters={until}", "train.resume=auto")

    records = [r for r in read_metrics(straight) if "loss" in r]
    assert all("disc_loss" not in r for r in records[:2]) and all("disc_loss" in r for r in records[2:])
    assert len({r["disc_loss"] for r in records[2:]}) == 4 and all(r["adaptive_weight"] > 0 for r in records[2:])
    assert all(r["perceptual_loss"] > 0 and r["kl_loss"] > 0 for r in records)
    again = [r for r in read_metrics(resumed) if "loss" in r]
    for a, b in zip(records, again, strict=True):
        for key in ("loss", "pixel_loss", "perceptual_loss", "kl_loss", "gan_loss", "disc_loss", "r1_penalty", "logits_real"):
            assert a.get(key) == b.get(key), (a["step"], key)
    evaluations = [r for r in read_metrics(straight) if "eval_psnr" in r]
    assert [r["step"] for r in evaluations] == [3, 6] and all("eval_lpips" in r for r in evaluations)

    a, b = read_folder(straight / "6" / "vae"), read_folder(resumed / "6" / "vae")
    for name in a:
        assert_identical(b[name], a[name], name)
    da = torch.load(straight / "6" / "discriminator" / MODEL_STATES, weights_only=False)["module"]
    db = torch.load(resumed / "6" / "discriminator" / MODEL_STATES, weights_only=False)["module"]
    for name in da:
        assert_identical(db[name], da[name], name)

    # SAT's layout: the VAE and both loss networks round-trip
    out = tmp_path / "3d-vae.pt"
    assert train_vae_tool(["--export-sat", str(straight / "6"), str(out)]) == 0
    sat = read_sat_state_dict(out)
    vae = VideoVAEMixin.from_config(load_config(VAE_BASE, [f"model.first_stage.path={out}"]).model.first_stage).vae
    expected = read_folder(straight / "6" / "vae")
    for name, value in vae.state_dict().items():
        assert_identical(value, expected[name], name)
    discriminator = discriminator_from_state_dict(sat, dim=2, image_size=(32, 32), frame_num=9, max_dim=16, first_frame=True)
    for name, value in discriminator.state_dict().items():
        assert_identical(value, da[name], name)
    assert any(key.startswith("loss.perceptual_model.lin0") for key in sat)
    assert train_vae_tool(["--export-sat", str(straight / "6"), str(out)]) == 2  # never overwritten unasked

    # a run from that file warm-starts both loss networks from its loss.* (no LPIPS files named)
    with one_process_group():
        warm = keys(clips, tmp_path / "warm", *GAN, f"model.first_stage.path={out}")
        networks = built_loss_networks(load_config(VAE_BASE, warm))
    for name, value in networks["discriminator"].items():
        assert_identical(value, da[name], name)
    files = lpips_from_files(clips / "vgg16.pth", clips / "lpips_vgg.pth").state_dict()
    for name, value in networks["lpips"].items():
        assert_identical(value, files[name], name)


def built_loss_networks(cfg) -> dict:
    """The state dicts of the discriminator and LPIPS a VAE run starts with (its engines closed again)."""
    trainer = VaeTrainer(cfg)
    try:
        return {"discriminator": trainer.disc_engine.module.state_dict(), "lpips": trainer.lpips.state_dict()}
    finally:
        trainer.close()


def read_folder(folder):
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX.from_pretrained(folder).state_dict()


@pytest.mark.slow
def test_two_processes_train_both_players(clips, tmp_path):
    save = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "tools" / "train_vae.py"), "--base", *map(str, VAE_BASE),
               *keys(clips, save, *GAN, "vae.loss.disc_start=1", "vae.loss.perceptual_weight=0", "train.train_iters=3",
                      "deepspeed.precision=bf16")]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = read_metrics(save)
    assert [r["step"] for r in records if "disc_loss" in r] == [1, 2, 3]
    assert [r["eval_samples"] for r in records if "eval_psnr" in r] == [3]  # the ranks shared the three clips
    assert (save / "3" / "vae" / "config.json").is_file()
    assert json.loads((save / "3" / "vae" / "config.json").read_text())["_class_name"] == "AutoencoderKLCogVideoX"


def test_bad_settings_are_refused_before_anything_runs():
    def refused(*overrides):
        with pytest.raises(ConfigError) as err:
            check_vae_run(load_config(VAE_BASE, list(overrides)))
        return str(err.value)

    assert "vgg16-397923af.pth" in refused("vae.loss.perceptual_weight=1.0")
    assert "vae.lpips" in refused("vae.lpips.vgg16=a.pth")
    assert "zero_stage=3" in refused("deepspeed.zero_stage=3")
    assert "fp16" in refused("deepspeed.precision=fp16")
    assert "vae.crop" in refused("vae.crop=[64,64]")
    assert "vae.crop" in refused("vae.crop=[12,16]")
    assert "cache_latents" in refused("data.cache_latents=true")
    assert "vae.trainable" in refused("train.trainable=[decoder.*]")
    check_vae_run(load_config(VAE_BASE, ["vae.crop=[16,16]"]))
