"""T5TextEncoder and make_tiny_t5: a tiny random T5 with a sentencepiece tokenizer trained on a few captions."""

import pytest
import sentencepiece
import torch
from transformers import T5EncoderModel

from mixins.t5_encoder import T5TextEncoder
from sat_video.common.errors import ConfigError
from sat_video.fixtures.tiny_t5 import make_tiny_t5
from sat_video.model.config import TextEncoderConfig
from tests.numerics import assert_close_rel, assert_identical

CAPTIONS = [
    "a cat sits on a red mat",
    "a dog runs across the green field",
    "two birds fly over the sea at dawn",
    "a person rides a bicycle down the street",
    "waves crash on a rocky shore",
]
TEXT_LENGTH = 24
D_MODEL = 32
PAD_ID, EOS_ID = 0, 1


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return make_tiny_t5(CAPTIONS, tmp_path_factory.mktemp("t5") / "tiny_t5", d_model=D_MODEL)


@pytest.fixture(scope="module")
def encoder(t5_dir):
    return T5TextEncoder.from_config(TextEncoderConfig(path=str(t5_dir)), TEXT_LENGTH, D_MODEL)


def padded_ids(t5_dir, captions):
    """What T5's tokenizer gives with padding="max_length", truncation=True, built from sentencepiece alone."""
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(t5_dir / "spiece.model"))
    rows = [tokenizer.encode(caption)[: TEXT_LENGTH - 1] + [EOS_ID] for caption in captions]
    return torch.tensor([row + [PAD_ID] * (TEXT_LENGTH - len(row)) for row in rows])


def test_output_shape(encoder):
    embeddings = encoder.encode_text(CAPTIONS[:3])
    assert embeddings.shape == (3, TEXT_LENGTH, D_MODEL)
    assert embeddings.dtype == torch.float32 and torch.isfinite(embeddings).all()


def test_tokens_are_padded_and_truncated(encoder, t5_dir):
    long_caption = " ".join(CAPTIONS * 3)
    ids = encoder.tokenize([CAPTIONS[0], long_caption])
    assert ids.shape == (2, TEXT_LENGTH)
    assert_identical(ids, padded_ids(t5_dir, [CAPTIONS[0], long_caption]))
    short = ids[0].tolist()
    num_tokens = short.index(EOS_ID) + 1
    assert num_tokens < TEXT_LENGTH and short[num_tokens:] == [PAD_ID] * (TEXT_LENGTH - num_tokens)
    assert ids[1, -1] == EOS_ID and PAD_ID not in ids[1].tolist()
    with pytest.raises(TypeError, match="a single string"):
        encoder.tokenize(CAPTIONS[0])


def test_text_past_text_length_is_cut(encoder):
    prefix = " ".join(CAPTIONS * 3)
    first, second = encoder.encode_text([prefix + " a cat", prefix + " waves crash on the shore"])
    assert_identical(first, second)


def test_different_captions_differ(encoder):
    first, second = encoder.encode_text(CAPTIONS[:2])
    assert (first - second).abs().max() > 1e-3


def test_matches_t5_on_padded_ids_without_mask(encoder, t5_dir):
    ids = padded_ids(t5_dir, CAPTIONS)
    t5 = T5EncoderModel.from_pretrained(t5_dir, local_files_only=True).eval()
    with torch.no_grad():
        expected = t5(input_ids=ids).last_hidden_state
        masked = t5(input_ids=ids, attention_mask=(ids != PAD_ID).long()).last_hidden_state
    embeddings = encoder.encode_text(CAPTIONS)
    assert_identical(embeddings, expected)
    # SAT and diffusers attend to the padding too: a mask would change every token's embedding.
    assert (embeddings - masked).abs().max() > 1e-3


def test_runs_in_the_dtype_it_is_moved_to(t5_dir, encoder):
    double = T5TextEncoder.from_config(TextEncoderConfig(path=str(t5_dir)), TEXT_LENGTH, D_MODEL).to(torch.float64)
    embeddings = double.encode_text(CAPTIONS[:2])
    assert embeddings.dtype == torch.float64
    assert_close_rel(embeddings.float(), encoder.encode_text(CAPTIONS[:2]), rtol=1e-4)  # float32 rounding, every layer


def test_same_seed_same_files_and_untouched_rng(tmp_path):
    rng_state = torch.random.get_rng_state()
    first = make_tiny_t5(CAPTIONS, tmp_path / "first", seed=3)
    second = make_tiny_t5(CAPTIONS, tmp_path / "second", seed=3)
    other = make_tiny_t5(CAPTIONS, tmp_path / "other", seed=4)
    assert torch.equal(rng_state, torch.random.get_rng_state())
    assert (first / "spiece.model").read_bytes() == (second / "spiece.model").read_bytes()
    weights = [T5EncoderModel.from_pretrained(folder, local_files_only=True).state_dict() for folder in (first, second, other)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert not torch.equal(weights[0]["shared.weight"], weights[2]["shared.weight"])


def test_frozen(encoder):
    assert not any(param.requires_grad for param in encoder.parameters())
    encoder.train()
    assert not encoder.training and not any(module.training for module in encoder.modules())


def test_missing_path_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.text_encoder\.path is not set"):
        T5TextEncoder.from_config(TextEncoderConfig(), TEXT_LENGTH, D_MODEL)
    missing = tmp_path / "no_such_t5"
    with pytest.raises(ConfigError, match=rf"model\.text_encoder\.path: folder not found: {missing}"):
        T5TextEncoder.from_config(TextEncoderConfig(path=str(missing)), TEXT_LENGTH, D_MODEL)


def test_tokenizer_path_without_spiece_model(t5_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.text_encoder\.tokenizer_path: no spiece\.model"):
        T5TextEncoder.from_config(TextEncoderConfig(path=str(t5_dir), tokenizer_path=str(tmp_path)), TEXT_LENGTH, D_MODEL)


def test_hidden_size_mismatch(t5_dir):
    with pytest.raises(ConfigError, match=r"model\.dit\.text_hidden_size is 64 but .* has d_model 32"):
        T5TextEncoder.from_config(TextEncoderConfig(path=str(t5_dir)), TEXT_LENGTH, 64)


def test_refuses_a_non_empty_out_dir(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="taken"):
        make_tiny_t5(CAPTIONS, tmp_path / "taken")
    assert sorted(path.name for path in (tmp_path / "taken").iterdir()) == ["notes.txt"]


def test_a_truncated_caption_is_reported_once(t5_dir, caplog):
    encoder = T5TextEncoder.from_config(TextEncoderConfig(path=str(t5_dir)), TEXT_LENGTH, D_MODEL)
    long_caption = " ".join([CAPTIONS[0]] * 4)
    with caplog.at_level("WARNING", logger="sat_video.text"):
        encoder.tokenize([CAPTIONS[0]])
        assert not caplog.records
        encoder.tokenize([long_caption, long_caption])
        encoder.tokenize([long_caption])
    assert len(caplog.records) == 1
    assert f"caption truncated to {TEXT_LENGTH - 1} tokens" in caplog.records[0].getMessage()


def test_the_tiny_tokenizer_keeps_caption_words_whole(t5_dir):
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(t5_dir / "spiece.model"))
    caption = CAPTIONS[0]
    assert [piece.lstrip("\u2581") for piece in tokenizer.encode(caption, out_type=str)] == caption.split()
