"""LPIPS: loading from torchvision's / lpips's files and from SAT's state-dict names, the formula, frozenness, errors.

The weight files are fakes of the real layouts (random tensors under the real names and shapes), written once per module.
"""

import pytest
import torch
import torch.nn.functional as F

from sat_video.common.errors import CheckpointError
from sat_video.vae_training.lpips import LPIPS, LPIPS_FILES_HINT, lpips_from_files, lpips_from_state_dict, random_lpips
from tests.numerics import assert_close_rel, assert_identical

# torchvision's vgg16().features: (index, in, out) of each 3x3 conv; a 2x2 max pool sits before 5, 10, 17 and 24.
CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
         (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512)]
POOLED = {5, 10, 17, 24}
TAPS = {2: 0, 7: 1, 14: 2, 21: 3, 28: 4}  # relu1_2 ... relu5_3 -> head
SLICE = {index: 1 + sum(index >= start for start in (4, 9, 16, 23)) for index, _, _ in CONVS}
HEAD_CHANNELS = [64, 128, 256, 512, 512]
SHIFT = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
SCALE = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """VGG16 is many small convs: two threads on a shared 2-core machine wait on each other longer than they compute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """Fake ``vgg16-397923af.pth`` and ``vgg.pth`` files, their tensors, and the model read from them."""
    generator = torch.Generator().manual_seed(7)
    vgg = {}
    for index, c_in, c_out in CONVS:
        vgg[f"features.{index}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=generator) * (2 / (9 * c_in)) ** 0.5
        vgg[f"features.{index}.bias"] = torch.randn(c_out, generator=generator) * 0.01
    # The real classifier is 120M numbers; it is ignored, so small stand-ins under its names do.
    vgg |= {"classifier.0.weight": torch.zeros(4, 8), "classifier.6.bias": torch.zeros(10)}
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator) for k, c in enumerate(HEAD_CHANNELS)}
    folder = tmp_path_factory.mktemp("lpips")
    torch.save(vgg, folder / "vgg16-397923af.pth")
    torch.save(heads, folder / "vgg.pth")
    model = lpips_from_files(folder / "vgg16-397923af.pth", str(folder / "vgg.pth"))
    return folder, vgg, heads, model


def sat_names(vgg, heads, prefix):
    """The tensors as a SAT VAE checkpoint names them (taming's LPIPS under ``prefix``)."""
    state = {f"{prefix}net.slice{SLICE[int(key.split('.')[1])]}.{key.split('.', 1)[1]}": value
             for key, value in vgg.items() if key.startswith("features.")}
    state |= {prefix + key: value for key, value in heads.items()}
    return state | {f"{prefix}scaling_layer.shift": SHIFT, f"{prefix}scaling_layer.scale": SCALE}


def images(*shape, seed):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_files_and_sat_state_dicts_load_the_same_network(fake):
    _, vgg, heads, from_files = fake
    others = {"loss.discr_3d.conv.weight": torch.zeros(3), "encoder.conv_in.weight": torch.zeros(2),
              "loss.logvar": torch.zeros(())}
    x, y = images(2, 3, 32, 48, seed=0), images(2, 3, 32, 48, seed=1)
    expected = from_files(x, y)
    assert expected.shape == (2,)
    for prefix in ("loss.perceptual_model.", "loss.perceptual_loss.", "perceptual_model.", "perceptual_loss."):
        model = lpips_from_state_dict(sat_names(vgg, heads, prefix) | others)
        assert isinstance(model, LPIPS)
        assert_identical(model(x, y), expected, prefix)
    assert lpips_from_state_dict(others) is None


def test_matches_the_formula_written_out(fake):
    _, vgg, heads, model = fake
    x, y = images(3, 3, 24, 40, seed=2), images(3, 3, 24, 40, seed=3)  # 24 rows: odd maps (3 -> 1) after the pools

    def features(image):
        h, taps = (image - SHIFT) / SCALE, []
        for index, _, _ in CONVS:
            h = F.max_pool2d(h, 2) if index in POOLED else h
            h = F.relu(F.conv2d(h, vgg[f"features.{index}.weight"], vgg[f"features.{index}.bias"], padding=1))
            if index in TAPS:
                taps.append(h)
        return taps

    expected = torch.zeros(3)
    for k, (fx, fy) in enumerate(zip(features(x), features(y))):
        nx = fx / (torch.sqrt((fx ** 2).sum(1, keepdim=True)) + 1e-10)
        ny = fy / (torch.sqrt((fy ** 2).sum(1, keepdim=True)) + 1e-10)
        expected += ((nx - ny) ** 2 * heads[f"lin{k}.model.1.weight"]).sum(1).mean((1, 2))
    assert_close_rel(model(x, y), expected)


def test_a_distance_zero_for_equal_images_positive_and_symmetric_otherwise(fake):
    model = fake[3]
    x, y = images(2, 3, 16, 32, seed=4), images(2, 3, 16, 32, seed=5)
    assert torch.equal(model(x, x.clone()), torch.zeros(2))
    forward = model(x, y)
    assert (forward > 0).all()
    assert_identical(model(y, x), forward)


def test_frozen_but_differentiable_in_its_inputs(fake):
    model = fake[3]
    x, y = images(2, 3, 32, 16, seed=6).requires_grad_(), images(2, 3, 32, 16, seed=7)
    before = model(x, y)
    model.train()  # as a parent loss module would; the heads' dropout must stay off
    assert not model.training and not any(module.training for module in model.modules())
    distance = model(x, y)
    assert_identical(distance, before)
    distance.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and x.grad.isfinite().all()
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


@pytest.mark.parametrize("x_shape, y_shape", [((1, 3, 8, 32), (1, 3, 8, 32)), ((1, 3, 16, 16), (2, 3, 16, 16)),
                                              ((1, 1, 16, 16), (1, 1, 16, 16))])
def test_refuses_images_it_cannot_measure(fake, x_shape, y_shape):
    with pytest.raises(ValueError, match="H, W >= 16"):
        fake[3](torch.zeros(x_shape), torch.zeros(y_shape))


def test_random_lpips_is_deterministic_and_leaves_the_global_rng_alone():
    rng = torch.get_rng_state()
    first, again = random_lpips(0).state_dict(), random_lpips(0).state_dict()
    assert torch.equal(torch.get_rng_state(), rng)
    assert first.keys() == again.keys() and all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(random_lpips(1).state_dict()["lin0.model.1.weight"], first["lin0.model.1.weight"])


def saved(path, obj):
    torch.save(obj, path)
    return path


def written(path, text):
    path.write_text(text)
    return path


# How a file goes wrong -> (vgg16 file, heads file, what the message must name); each gets the fixture's tensors and
# folder and a folder of its own.
FILE_CASES = {
    "vgg16 missing": lambda vgg, heads, fixed, own: (
        own / "absent.pth", fixed / "vgg.pth", ["absent.pth", "no such file", "vgg16-397923af.pth"]),
    "heads missing": lambda vgg, heads, fixed, own: (
        fixed / "vgg16-397923af.pth", own / "absent.pth", ["absent.pth", "no such file", "lpips/weights/v0.1/vgg.pth"]),
    "not a torch file": lambda vgg, heads, fixed, own: (
        written(own / "vgg16.pth", "weights"), fixed / "vgg.pth", ["vgg16.pth", "cannot be read"]),
    "not a state dict": lambda vgg, heads, fixed, own: (
        fixed / "vgg16-397923af.pth", saved(own / "heads.pth", [torch.zeros(1)]), ["heads.pth", "not a state dict"]),
    "vgg16 key missing": lambda vgg, heads, fixed, own: (
        saved(own / "vgg16.pth", {k: v for k, v in vgg.items() if k != "features.28.bias"}), fixed / "vgg.pth",
        ["vgg16.pth", "missing", "features.28.bias"]),
    "vgg16 key unexpected": lambda vgg, heads, fixed, own: (  # vgg16_bn's layout
        saved(own / "vgg16.pth", vgg | {"features.1.running_mean": torch.zeros(64)}), fixed / "vgg.pth",
        ["vgg16.pth", "unexpected", "features.1.running_mean"]),
    "heads key unexpected": lambda vgg, heads, fixed, own: (
        fixed / "vgg16-397923af.pth", saved(own / "heads.pth", heads | {"lin5.model.1.weight": torch.zeros(1)}),
        ["heads.pth", "unexpected", "lin5.model.1.weight"]),
    "heads wrong shape": lambda vgg, heads, fixed, own: (
        fixed / "vgg16-397923af.pth", saved(own / "heads.pth", heads | {"lin2.model.1.weight": torch.zeros(1, 128, 1, 1)}),
        ["heads.pth", "lin2.model.1.weight", "(1, 256, 1, 1)", "(1, 128, 1, 1)"]),
    "files swapped": lambda vgg, heads, fixed, own: (
        fixed / "vgg.pth", fixed / "vgg16-397923af.pth", ["vgg.pth", "missing", "features.0.weight"]),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_bad_files_raise_checkpoint_errors_naming_file_and_key(fake, tmp_path, case):
    folder, vgg, heads, _ = fake
    vgg_file, heads_file, named = FILE_CASES[case](vgg, heads, folder, tmp_path)
    with pytest.raises(CheckpointError) as raised:
        lpips_from_files(vgg_file, heads_file)
    assert all(text in str(raised.value) for text in named), (named, str(raised.value))


def test_the_hint_names_both_files():
    assert "vgg16-397923af.pth" in LPIPS_FILES_HINT and "lpips/weights/v0.1/vgg.pth" in LPIPS_FILES_HINT


P = "loss.perceptual_model."
STATE_CASES = {
    "key missing": (lambda state: {k: v for k, v in state.items() if k != P + "net.slice3.14.weight"},
                    ["missing", P + "net.slice3.14.weight"]),
    "key unexpected": (lambda state: state | {P + "lin5.model.1.weight": torch.zeros(1, 512, 1, 1)},
                       ["unexpected", P + "lin5.model.1.weight"]),
    "wrong shape": (lambda state: state | {P + "net.slice1.0.weight": torch.zeros(64, 1, 3, 3)},
                    [P + "net.slice1.0.weight", "(64, 3, 3, 3)", "(64, 1, 3, 3)"]),
    "two prefixes": (lambda state: state | {"loss.perceptual_loss.lin0.model.1.weight": torch.zeros(1, 64, 1, 1)},
                     [P, "loss.perceptual_loss."]),
}


@pytest.mark.parametrize("case", list(STATE_CASES))
def test_bad_state_dicts_raise_checkpoint_errors_naming_source_and_key(fake, case):
    spoil, named = STATE_CASES[case]
    with pytest.raises(CheckpointError) as raised:
        lpips_from_state_dict(spoil(sat_names(fake[1], fake[2], P)), source="3d-vae.pt")
    assert all(text in str(raised.value) for text in named + ["3d-vae.pt"]), (named, str(raised.value))
