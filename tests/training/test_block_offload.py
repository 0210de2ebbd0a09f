"""Block offload while training (train.offload_blocks): the same losses and gradients bit for bit, the device bytes
falling by what offloaded_bytes predicts, and the refusals."""

import pytest
import torch

import sat_video
from sat_video.common.errors import ConfigError
from sat_video.training.block_offload import BlockOffload, check_block_offload, device_weight_bytes, offloaded_bytes
from sat_video.training.callbacks import Callback
from sat_video.training.optim import select_trainable
from tests.conftest import ROOT, randomize_, tiny_inputs
from tests.numerics import assert_identical
from tests.training.runs import BASE, metrics, train_here

LORA = ["mixins.lora.*"]


def lora_config(*overrides):
    return sat_video.load_config([ROOT / "configs" / name for name in ("cogvideox_5b.yaml", "tiny.yaml", "lora.yaml")],
                                 ["model.dit.num_layers=3", "model.dit.mixins.lora.rank=4", *overrides])


def lora_dit(cfg, trainable=LORA, device=None):
    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        dit = sat_video.build_dit(cfg)
    if device is None:
        randomize_(dit)  # LoRA's B starts at zero: perturbed, every adapter changes the output
    select_trainable(dit, trainable)
    dit.activation_checkpointing = True
    return dit


def loss_and_grads(dit, inputs):
    x, timesteps, context, _ = inputs
    loss = dit(x, timesteps, context).square().mean()
    loss.backward()
    grads = {name: param.grad for name, param in dit.named_parameters() if param.requires_grad}
    for param in dit.parameters():
        param.grad = None
    return loss.detach(), grads


def test_losses_and_gradients_are_bit_identical_and_the_device_holds_what_is_predicted():
    cfg = lora_config()
    inputs = tiny_inputs(cfg, batch=1)
    reference = loss_and_grads(lora_dit(cfg), inputs)

    dit = lora_dit(cfg)
    full = device_weight_bytes(dit)
    predicted = offloaded_bytes(dit, 2, device_type="cpu")
    block = offloaded_bytes(dit, 1, device_type="cpu").host
    assert predicted == (2 * block, block)  # blocks of one size; the CPU holds one in flight
    offload = BlockOffload(dit, 2, "cpu")
    assert device_weight_bytes(dit) == full - predicted.host

    seen = []  # (block, in backward, device bytes) as each block starts, after offload's own pre-hook
    for index, layer in enumerate(dit.transformer.layers):
        layer.register_forward_pre_hook(
            lambda *_, i=index: seen.append((i, torch._C._current_graph_task_id() != -1, device_weight_bytes(dit))))
    for _ in range(2):  # the second step starts from what the first left
        loss, grads = loss_and_grads(dit, inputs)
        assert_identical(loss, reference[0], "loss")
        assert grads.keys() == reference[1].keys()
        for name, grad in grads.items():
            assert_identical(grad, reference[1][name], name)
        assert offload.loaded_bytes == 0 and device_weight_bytes(dit) == full - predicted.host

    # forward 0, 1, 2, then each block's recomputation in backward, top down; an offloaded block is in while it runs
    assert [(i, backward) for i, backward, _ in seen[:6]] == [(0, False), (1, False), (2, False), (2, True), (1, True), (0, True)]
    assert [bytes_ for *_, bytes_ in seen[:6]] == [full - block, full - block, full - 2 * block] + [full - 2 * block,
                                                                                                  full - block, full - block]
    assert offload.peak_loaded_bytes == predicted.in_flight

    offload.close()
    assert device_weight_bytes(dit) == full
    assert_identical(loss_and_grads(dit, inputs)[0], reference[0], "loss after close")


def test_checkpoints_hold_the_offloaded_weights():
    cfg = lora_config()
    expected = lora_dit(cfg).state_dict()
    dit = lora_dit(cfg)
    offload = BlockOffload(dit, 3, "cpu")
    state = dit.state_dict()  # the host tensors, not the placeholders
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert_identical(state[key], value, key)
    with offload.on_host():  # DeepSpeed's save and load see every parameter whole
        assert device_weight_bytes(dit) == device_weight_bytes(lora_dit(cfg))
        dit.load_state_dict({key: torch.zeros_like(value) for key, value in expected.items()})
    assert device_weight_bytes(dit) < device_weight_bytes(lora_dit(cfg))
    assert all(value.count_nonzero() == 0 for value in dit.state_dict().values())


def test_the_planner_figure_needs_no_weights():
    cfg = lora_config()
    real, meta = lora_dit(cfg), lora_dit(cfg, device="meta")
    assert offloaded_bytes(meta, 2, itemsize=4, device_type="cpu") == offloaded_bytes(real, 2, device_type="cpu")
    bf16 = offloaded_bytes(meta, 3, itemsize=2)
    assert bf16.host * 2 == offloaded_bytes(real, 3).host
    assert bf16.in_flight == bf16.host  # CUDA: the block computing, the next one copying, the one just dropped
    # the frozen weights of block 0 and of its mixins' per-block modules go; LoRA's adapters (trainable) stay
    _, members = real.block_groups()[0]
    params = {id(p): p for member in members for p in member.parameters()}.values()
    assert any(p.requires_grad for p in params)
    assert offloaded_bytes(real, 1).host == sum(p.nbytes for p in params if not p.requires_grad)


@pytest.mark.parametrize(("trainable", "settings", "words"), [
    (["*"], {}, ["transformer.layers.0.", "frozen", "LoRA"]),
    (LORA, {"activation_checkpointing": False}, ["activation_checkpointing=true"]),
    (LORA, {"zero_stage": 3}, ["ZeRO-3"]),
    (LORA, {"compiled": True}, ["train.compile"]),
])
def test_what_cannot_be_offloaded_is_refused_with_the_reason(trainable, settings, words):
    dit = lora_dit(lora_config(), trainable, device="meta")
    with pytest.raises(ConfigError, match="train.offload_blocks=2") as error:
        check_block_offload(dit, 2, **{"activation_checkpointing": True, "zero_stage": 2, **settings})
    assert all(word in str(error.value) for word in words), str(error.value)
    with pytest.raises(ConfigError, match="the DiT has 3 blocks"):
        check_block_offload(dit, 4, activation_checkpointing=True, zero_stage=2)
    check_block_offload(dit, 0, activation_checkpointing=False, zero_stage=3, compiled=True)  # off: nothing to refuse


def test_a_block_run_with_gradients_but_without_checkpointing_fails_loudly():
    cfg = lora_config()
    dit = lora_dit(cfg)
    BlockOffload(dit, 1, "cpu")
    dit.activation_checkpointing = False
    x, timesteps, context, _ = tiny_inputs(cfg, batch=1)
    with pytest.raises(ConfigError, match="activation checkpointing"):
        dit(x, timesteps, context)
    with torch.no_grad():  # sampling (validation) needs no backward
        dit(x, timesteps, context)


class Watch(Callback):
    """Records, after each step, the offloaded bytes the step had on the device at most and the DiT's device bytes."""

    name = "watch"

    def __init__(self):
        self.seen = []

    def on_step_end(self, trainer, step):
        self.seen.append((trainer.block_offload.peak_loaded_bytes, device_weight_bytes(trainer.engine.module.dit)))

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.slow
def test_a_lora_run_trains_and_resumes_the_same_with_offload(train_assets, tmp_path):
    lora = [str(ROOT / "configs" / "lora.yaml")]
    keys = ["train.train_iters=2", "train.save_interval=1", "train.activation_checkpointing=true",
            "model.dit.mixins.lora.rank=4", "train.micro_batch_size=1"]
    train_here(train_assets, tmp_path / "plain", *keys, base=BASE + lora)
    watch = Watch()
    train_here(train_assets, tmp_path / "offload", *keys, "train.offload_blocks=2", base=BASE + lora, callbacks=[watch])
    assert [m["loss"] for m in metrics(tmp_path / "offload")] == [m["loss"] for m in metrics(tmp_path / "plain")]
    plain = torch.load(tmp_path / "plain" / "2" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    offloaded = torch.load(tmp_path / "offload" / "2" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    for key, value in plain.items():
        assert_identical(offloaded[key], value, key)
    dit = lora_dit(sat_video.load_config(BASE + lora, ["model.dit.mixins.lora.rank=4"]), device="meta")
    predicted = offloaded_bytes(dit, 2, device_type="cpu")
    full = sum(p.nbytes for p in dit.parameters()) + sum(b.nbytes for b in dit.buffers())
    assert watch.seen == [(predicted.in_flight, full - predicted.host)] * 2
    # resuming loads the checkpoint into the host copies and trains on
    train_here(train_assets, tmp_path / "offload", *keys, "train.offload_blocks=2", "train.train_iters=3",
               "train.resume=latest", base=BASE + lora, callbacks=[Watch()])
    assert len(metrics(tmp_path / "offload")) == 3
