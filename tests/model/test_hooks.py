"""The mixin system: composition checked on add, rollback on failure, call order, no side effects."""

import pytest
import torch
import torch.nn.functional as F

import sat_video
from mixins.adaln import AdaLNMixin
from mixins.rotary3d import Rotary3DMixin
from sat_video import HookConflictError, MissingHookError, Mixin, wraps_previous
from sat_video.model.config import DiTConfig
from sat_video.model.context import BlockHooks
from sat_video.model.hooks import HOOKS
from tests.conftest import randomize_, tiny_config, tiny_inputs


class ScaledAttention(Mixin):
    """Wraps whatever attention kernel lies beneath and records that it ran."""

    def __init__(self, dit_config, config=None):
        super().__init__(dit_config, config)
        self.calls = 0

    @wraps_previous
    def attention_kernel(self, q, k, v, ctx, layer_idx, *, inner):
        self.calls += 1
        return 2.0 * inner(q, k, v, ctx, layer_idx)


class PlainAttention(Mixin):
    """A second replacement of the attention kernel: conflicts with any other replacement."""

    def attention_kernel(self, q, k, v, ctx, layer_idx):
        return F.scaled_dot_product_attention(q, k, v)


class OtherLayer(Mixin):
    def layer_forward(self, layer, hidden, ctx, layer_idx):
        return hidden


def _model(variant="cogvideox_5b"):
    torch.manual_seed(0)
    return randomize_(sat_video.build_dit(tiny_config(variant)))


def test_describe_hooks_shows_every_hook_and_its_contributors():
    model = _model()
    text = model.describe_hooks()
    for spec in HOOKS:
        assert spec.name in text
    assert model.hook_origins["process_qkv"] == ["adaln_layer", "pos_embed"]
    assert model.hook_origins["layer_forward"] == ["adaln_layer"]
    assert model.hook_origins["attention_kernel"] == ["default"]


def test_a_wrapping_mixin_chains_around_the_current_implementation():
    model = _model()
    x, t, c, _ = tiny_inputs(tiny_config("cogvideox_5b"))
    with torch.no_grad():
        before = model(x, t, c)
        wrapper = ScaledAttention(model.dit_config)
        model.add_mixin("scaled", wrapper)
        after = model(x, t, c)
    assert model.hook_origins["attention_kernel"] == ["default", "scaled"]
    assert wrapper.calls == model.dit_config.num_layers
    assert not torch.allclose(before, after)
    model.del_mixin("scaled")
    with torch.no_grad():
        assert torch.equal(model(x, t, c), before)


def test_a_conflicting_mixin_is_refused_naming_both_and_nothing_changes():
    model = _model()
    model.add_mixin("first", PlainAttention(model.dit_config))
    hooks, origins = model._hooks, model.hook_origins
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(HookConflictError, match="'first' and 'second' both replace hook 'attention_kernel'"):
        model.add_mixin("second", PlainAttention(model.dit_config))
    assert model._hooks is hooks and model.hook_origins == origins
    assert list(model.mixins) == ["patch_embed", "adaln_layer", "pos_embed", "final_layer", "first"]
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # the model still works and still accepts valid mixins afterwards
    model.add_mixin("scaled", ScaledAttention(model.dit_config))
    assert model.hook_origins["attention_kernel"] == ["first", "scaled"]


def test_conflict_with_a_shipped_mixin_names_it():
    model = _model()
    with pytest.raises(HookConflictError, match="'adaln_layer' and 'mine' both replace hook 'layer_forward'"):
        model.add_mixin("mine", OtherLayer(model.dit_config))


def test_other_add_errors_leave_the_model_unchanged():
    model = _model()
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="already added"):
        model.add_mixin("pos_embed", PlainAttention(model.dit_config))
    other = DiTConfig.from_config(tiny_config("cogvideox_5b", "model.dit.num_layers=3"))
    with pytest.raises(ValueError, match="num_layers"):
        model.add_mixin("wrong_sizes", AdaLNMixin(other))
    with pytest.raises(ValueError, match="identifier"):
        model.add_mixin("not-a-name", PlainAttention(model.dit_config))
    assert list(model.state_dict()) == keys


def test_chain_priority_puts_qk_norm_before_rope_whatever_the_insertion_order():
    cfg = tiny_config("cogvideox_5b")
    reordered = tiny_config("cogvideox_5b")
    mixins = dict(reordered.model.dit.mixins)
    reordered.model.dit.mixins = {k: mixins[k] for k in ["patch_embed", "pos_embed", "adaln_layer", "final_layer"]}
    torch.manual_seed(0)
    a = randomize_(sat_video.build_dit(cfg))
    b = sat_video.build_dit(reordered)
    b.load_state_dict(a.state_dict())
    assert b.hook_origins["process_qkv"] == ["adaln_layer", "pos_embed"]
    x, t, c, _ = tiny_inputs(cfg)
    with torch.no_grad():
        assert torch.equal(a(x, t, c), b(x, t, c))


def test_hooks_run_in_data_flow_order():
    model = _model()
    calls = []

    class Recorder(Mixin):
        @wraps_previous
        def attention_kernel(self, q, k, v, ctx, layer_idx, *, inner):
            calls.append(("attention_kernel", layer_idx))
            return inner(q, k, v, ctx, layer_idx)

        @wraps_previous
        def mlp_forward(self, mlp, x, ctx, layer_idx, *, inner):
            calls.append(("mlp_forward", layer_idx))
            return inner(mlp, x, ctx, layer_idx)

        def add_position(self, hidden, ctx):
            calls.append(("add_position", None))
            return hidden

        def process_qkv(self, q, k, v, ctx, layer_idx):
            calls.append(("process_qkv", layer_idx))
            return q, k, v

    model.add_mixin("recorder", Recorder(model.dit_config))
    x, t, c, _ = tiny_inputs(tiny_config("cogvideox_5b"))
    with torch.no_grad():
        model(x, t, c)
    expected = [("add_position", None)]
    for layer in range(model.dit_config.num_layers):
        expected += [("process_qkv", layer), ("attention_kernel", layer), ("mlp_forward", layer)]
    assert calls == expected


def test_required_hooks_have_a_clear_error():
    cfg = tiny_config("cogvideox_5b", "model.dit.mixins.patch_embed=null")
    model = sat_video.build_dit(cfg)
    x, t, c, _ = tiny_inputs(cfg)
    with pytest.raises(MissingHookError, match="required hook 'embed'.*ImagePatchEmbedMixin"):
        model(x, t, c)


def test_construction_has_no_global_side_effects():
    state = torch.random.get_rng_state()
    seed = torch.initial_seed()
    with torch.device("meta"):
        model = sat_video.build_dit(sat_video.load_config(tiny_config("cogvideox_5b")))
    assert torch.initial_seed() == seed and torch.equal(torch.random.get_rng_state(), state)
    assert not torch.distributed.is_initialized()
    assert all(p.is_meta for p in model.parameters())


def test_rotary_learned_table_only_registers_add_position_when_enabled():
    dit_config = DiTConfig.from_config(tiny_config("cogvideox_5b"))
    assert "add_position" not in Rotary3DMixin(dit_config).implemented_hooks()
    assert "add_position" in Rotary3DMixin(dit_config, Rotary3DMixin.Config(learned_table=True)).implemented_hooks()


def test_deep_copies_dispatch_to_their_own_mixins():
    import copy

    model = _model()
    clone = copy.deepcopy(model)
    x, t, c, _ = tiny_inputs(tiny_config("cogvideox_5b"))
    with torch.no_grad():
        reference = model(x, t, c)
        for layernorm in clone.mixins.adaln_layer.query_layernorm_list:
            layernorm.weight.mul_(3.0)  # only the copy's qk-norm (a CHAIN link) changes
        assert torch.equal(model(x, t, c), reference)
        assert not torch.allclose(clone(x, t, c), reference)


class CountingProjection(Mixin):
    """Wraps the projection hook and records the name of every linear that passes through it."""

    def __init__(self, dit_config, config=None):
        super().__init__(dit_config, config)
        self.names = []

    @wraps_previous
    def project(self, linear, x, ctx, layer_idx, name, *, inner):
        self.names.append((layer_idx, name))
        return inner(linear, x, ctx, layer_idx, name)


def test_every_block_linear_goes_through_the_project_hook():
    model = _model()
    x, t, c, _ = tiny_inputs(tiny_config("cogvideox_5b"))
    with torch.no_grad():
        before = model(x, t, c)
        counter = CountingProjection(model.dit_config)
        model.add_mixin("count", counter)
        assert torch.equal(model(x, t, c), before)
    names = ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]
    assert counter.names == [(i, n) for i in range(model.dit_config.num_layers) for n in names]


class TimeToken(Mixin):
    """Prepends one token to the sequence; later stages must see it as a condition token."""

    @wraps_previous
    def embed(self, x, context, ctx, *, inner):
        hidden = inner(x, context, ctx)
        return torch.cat([hidden[:, :1] * 0.0 + 1.0, hidden], dim=1)


def test_tokens_prepended_by_embed_count_as_condition_tokens():
    model = _model()
    x, t, c, _ = tiny_inputs(tiny_config("cogvideox_5b"))
    seen = []
    model.add_mixin("time_token", TimeToken(model.dit_config))
    original = model._hooks.final_forward
    model._hooks.final_forward = lambda hidden, ctx: seen.append(ctx.num_condition_tokens) or original(hidden, ctx)
    with torch.no_grad():
        out = model(x, t, c)
    assert seen == [c.shape[1] + 1]
    assert out.shape[:2] == x.shape[:2]


def test_every_shipped_hook_override_has_the_catalogues_typed_signature():
    import inspect

    from sat_video.model.build import import_plugins
    from sat_video.model.registry import _MIXINS

    import_plugins()
    checked = 0
    for type_name, cls in _MIXINS.items():
        if not cls.__module__.startswith("mixins."):  # mixins that other tests register
            continue
        for spec in HOOKS:
            method = getattr(cls, spec.name)
            if method is getattr(Mixin, spec.name):
                continue
            declared = inspect.signature(getattr(Mixin, spec.name))
            override = inspect.signature(method)
            params = [p for p in override.parameters.values() if p.name != "inner"]
            assert [p.name for p in params] == list(declared.parameters), f"{type_name}.{spec.name}{override}"
            assert all(p.annotation is not p.empty for p in params[1:]), f"{type_name}.{spec.name} is not typed"
            assert override.return_annotation is not override.empty, f"{type_name}.{spec.name} has no return type"
            assert ("inner" in override.parameters) == getattr(method, "wraps_previous", False)
            checked += 1
    assert checked >= 13


def test_the_block_hooks_a_context_carries_are_catalogue_hooks_of_the_table():
    table = _model()._hooks
    assert set(BlockHooks.__annotations__) <= {spec.name for spec in HOOKS}
    assert all(callable(getattr(table, name)) for name in BlockHooks.__annotations__)
