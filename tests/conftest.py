"""Shared helpers: tiny configs of every shipped model, randomised weights, inputs."""

import os
from pathlib import Path

import pytest
import torch

import sat_video

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["cogvideox_2b", "cogvideox_5b", "cogvideox_5b_i2v", "cogvideox1.5_5b", "cogvideox1.5_5b_i2v"]


def tiny_config(variant: str, *overrides: str):
    return sat_video.load_config([ROOT / "configs" / f"{variant}.yaml", ROOT / "configs" / "tiny.yaml"], overrides)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Perturb every parameter so zero-initialised parts (modulations, gates, tables) matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * std)
    return model


def tiny_inputs(cfg, batch=2, frames=4, height=None, width=None, seed=0):
    dit_config = cfg.model.dit
    generator = torch.Generator().manual_seed(seed)
    height, width = height or dit_config.latent_height, width or dit_config.latent_width
    x = torch.randn(batch, frames, dit_config.in_channels, height, width, generator=generator)
    context = torch.randn(batch, dit_config.text_length, dit_config.text_hidden_size, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    ofs = torch.full((batch,), 2.0) if dit_config.ofs_embed_dim else None
    return x, timesteps, context, ofs


@pytest.fixture(autouse=True)
def restore_environment():
    """Code run in the test process (a tool's ``encode``, say) may join a one-process group, which sets RANK,
    MASTER_PORT, ... in ``os.environ``; later subprocesses must not inherit that rendezvous."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(params=VARIANTS)
def variant(request):
    return request.param


@pytest.fixture(scope="session")
def train_assets(tmp_path_factory):
    """Real mp4 clips of moving shapes with captions (SFT layout) and a tiny T5 trained on those captions."""
    from sat_video.fixtures.synthetic import make_moving_shapes
    from sat_video.fixtures.tiny_t5 import make_tiny_t5

    root = tmp_path_factory.mktemp("train_assets")
    items = make_moving_shapes(root / "data", num_videos=4, num_frames=16, height=64, width=64, fps=8, seed=0)
    make_tiny_t5([caption for _, caption in items], root / "t5", d_model=32)
    return root


def start_fake_build(folder):
    """A process that holds a torch extension build lock in ``folder`` and works there, as a ninja build does;
    returns it once the lock exists (SIGKILL it to leave the lock behind, as an interrupted first run does)."""
    import subprocess
    import sys

    script = (
        "import os, sys, time\n"
        "from torch.utils.file_baton import FileBaton\n"
        "os.makedirs(sys.argv[1], exist_ok=True); os.chdir(sys.argv[1])\n"
        "assert FileBaton('lock').try_acquire()\n"
        "print('building', flush=True); time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "building"
    return proc


def write_hostile_videos(folder, huge_size=(4096, 4608)):
    """Three videos whose headers lie or are absurd, as scraped data sets hold, each 16 frames long; returns
    ``{file name: words of the reason it is refused}``.

    * ``huge.mp4``: real frames of ``huge_size`` (height, width), beyond ``data.max_source_pixels``'s default;
    * ``hours.mkv``: 16 frames of 64 x 64 at 8 fps (2 s) in a container whose header declares three hours;
    * ``sparse.mp4``: 16 frames at one frame per half hour (eight hours declared).
    """
    import struct
    import subprocess
    from pathlib import Path

    import imageio_ffmpeg

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ffmpeg = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi"]
    encode = ["-frames:v", "16", "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "ultrafast"]
    height, width = huge_size
    subprocess.run([*ffmpeg, "-i", f"color=c=red:size={width}x{height}:rate=8", *encode, str(folder / "huge.mp4")], check=True)
    subprocess.run([*ffmpeg, "-i", "testsrc=size=64x64:rate=1/1800", *encode, str(folder / "sparse.mp4")], check=True)
    subprocess.run([*ffmpeg, "-i", "testsrc=size=64x64:rate=8", *encode, str(folder / "hours.mkv")], check=True)
    data = bytearray((folder / "hours.mkv").read_bytes())
    at = data.index(b"\x44\x89\x88")  # Matroska's segment Duration: an 8-byte float, in milliseconds
    struct.pack_into(">d", data, at + 3, 3 * 3600 * 1000.0)
    (folder / "hours.mkv").write_bytes(data)
    return {"huge.mp4": "exceeds data.max_source_pixels", "hours.mkv": "inconsistent stream: the header declares 10,800.0 s",
            "sparse.mp4": "fps is outside"}


def set_display_rotation(path, degrees):
    """Store a display matrix turning the video at ``path`` by ``degrees`` (counter-clockwise), as phones store portrait
    footage: the coded frames are copied as they are, and decoders show them turned."""
    import subprocess

    import imageio_ffmpeg

    turned = path.with_name(f"turned_{path.name}")
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-display_rotation", str(degrees),
                    "-i", str(path), "-c", "copy", str(turned)], check=True)
    turned.replace(path)


BUCKETS = [[9, 64, 112], [17, 64, 112], [9, 48, 64], [9, 112, 64], [1, 64, 112]]
# folder -> (frames, height, width) of its clips as coded, the bucket they belong in (None: too short for any), and the
# display rotation of each of its two clips
BUCKET_CLIPS = {
    "wide_short": ((16, 72, 128), "9x64x112", (0, 180)),   # 16:9, 2 s at 8 fps: fills 9 frames, not 17; one upside down
    "wide_long": ((32, 72, 128), "17x64x112", (0, 0)),     # 16:9, 4 s: the longer bucket
    "four_three": ((16, 96, 128), "9x48x64", (0, 0)),      # 4:3
    "tall": ((16, 80, 128), "9x112x64", (90, -90)),        # phone footage: coded landscape, displayed 9:16-ish portrait
    "too_short": ((4, 72, 128), None, (0, 0)),             # half a second: no 16:9 bucket is that short
}


@pytest.fixture(scope="session")
def bucket_clips(tmp_path_factory):
    """Two captioned mp4 clips per folder of BUCKET_CLIPS, plus an SFT folder with two 16:9 images."""
    import numpy as np
    from PIL import Image

    from sat_video.fixtures.synthetic import make_moving_shapes

    root = tmp_path_factory.mktemp("bucket_clips")
    for seed, (name, ((frames, height, width), _, rotations)) in enumerate(BUCKET_CLIPS.items()):
        for (path, _), degrees in zip(make_moving_shapes(root / name, 2, frames, height, width, 8, seed), rotations):
            if degrees:
                set_display_rotation(path, degrees)
    (root / "images" / "videos").mkdir(parents=True)
    (root / "images" / "labels").mkdir()
    for i in range(2):
        Image.fromarray(np.full((90, 160, 3), 40 * i, np.uint8)).save(root / "images" / "videos" / f"still_{i}.png")
        (root / "images" / "labels" / f"still_{i}.txt").write_text(f"a still picture {i}")
    return root
