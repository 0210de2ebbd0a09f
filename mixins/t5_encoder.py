"""T5TextEncoder: the frozen T5 text encoder (SAT's ``FrozenT5Embedder``), ``model.text_encoder.type: t5``.

Captions are tokenized with the folder's sentencepiece model (``spiece.model``) directly, which is what
the slow ``T5Tokenizer`` of SAT and of the diffusers CogVideoX pipeline does: sentencepiece ids, cut to
``text_length - 1``, then ``</s>``, then ``<pad>`` up to ``text_length``. transformers 5's ``T5Tokenizer``
would need protobuf to convert ``spiece.model``, and real T5 folders ship no ``tokenizer.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import sentencepiece
import torch

from sat_video.common.errors import ConfigError
from sat_video.model.config import TextEncoderConfig
from sat_video.model.registry import register_stage
from sat_video.model.stages import FrozenStage

if TYPE_CHECKING:
    from transformers import T5EncoderModel

logger = logging.getLogger("sat_video.text")

TOKENIZER_FILE = "spiece.model"
T5_SPECIAL_IDS = {"pad_id": 0, "eos_id": 1, "unk_id": 2}
"""T5 reserves these ids (``sat_video.fixtures.tiny_t5`` trains its tokenizer with the same layout)."""


def _local_folder(path: str | None, key: str) -> Path:
    if path is None:
        raise ConfigError(f"{key} is not set: it must name a local folder with the T5 encoder and its tokenizer")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{key}: folder not found: {folder}")
    return folder


@register_stage("t5")
class T5TextEncoder(FrozenStage):
    """Frozen ``T5EncoderModel`` that turns captions into ``[B, text_length, d_model]`` embeddings.

    It provides the ``encode_text`` hook of the frozen-stage catalogue; move it with ``.to(device, dtype)``.

    Args:
        transformer (`T5EncoderModel`): the encoder (SAT's attribute name for it).
        tokenizer (`sentencepiece.SentencePieceProcessor`): T5's sentencepiece model.
        text_length (`int`): tokens per caption after padding / truncation (CogVideoX: 226).
    """

    def __init__(self, transformer: T5EncoderModel, tokenizer: sentencepiece.SentencePieceProcessor, text_length: int):
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.text_length = text_length
        self._reported_truncation = False
        self.pad_id, self.eos_id = tokenizer.pad_id(), tokenizer.eos_id()

    @classmethod
    def from_config(cls, text_cfg: TextEncoderConfig, text_length: int, text_hidden_size: int) -> T5TextEncoder:
        """Load ``model.text_encoder`` from local folders, in the dtype its weights are stored in.

        Args:
            text_cfg: ``path`` holds ``config.json`` + weights; ``tokenizer_path`` (default ``path``) holds ``spiece.model``.
            text_length: ``model.dit.text_length``.
            text_hidden_size: ``model.dit.text_hidden_size``; must equal the encoder's ``d_model``.
        """
        model_dir = _local_folder(text_cfg.path, "model.text_encoder.path")
        tokenizer_key = "model.text_encoder.path" if text_cfg.tokenizer_path is None else "model.text_encoder.tokenizer_path"
        tokenizer_dir = model_dir if text_cfg.tokenizer_path is None else _local_folder(text_cfg.tokenizer_path, tokenizer_key)
        tokenizer_file = tokenizer_dir / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise ConfigError(f"{tokenizer_key}: no {TOKENIZER_FILE} (T5's sentencepiece tokenizer) in {tokenizer_dir}")
        tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_file))
        if tokenizer.pad_id() < 0 or tokenizer.eos_id() < 0:
            raise ConfigError(
                f"{tokenizer_file}: a T5 tokenizer needs pad and eos ids, "
                f"found pad {tokenizer.pad_id()}, eos {tokenizer.eos_id()}"
            )
        # Imported when an encoder is built, not when this stage registers: transformers takes seconds to import.
        from transformers import T5Config, T5EncoderModel

        config = T5Config.from_pretrained(model_dir, local_files_only=True)  # checked before loading the (large) weights
        if config.d_model != text_hidden_size:
            raise ConfigError(
                f"model.dit.text_hidden_size is {text_hidden_size} but the T5 encoder in {model_dir} has d_model {config.d_model}"
            )
        transformer = T5EncoderModel.from_pretrained(model_dir, config=config, local_files_only=True)
        return cls(transformer, tokenizer, text_length)

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """Token ids ``[B, text_length]`` on the CPU: truncated to leave room for ``</s>``, then right-padded."""
        if isinstance(captions, str):
            raise TypeError("T5TextEncoder: expected a list of captions, found a single string")
        rows = []
        for caption, ids in zip(captions, self.tokenizer.encode(list(captions))):
            if len(ids) >= self.text_length and not self._reported_truncation:
                # As diffusers does: say what the model will not see (once, training repeats captions).
                kept = self.tokenizer.decode(ids[: self.text_length - 1])
                logger.warning(
                    "caption truncated to %d tokens (model.dit.text_length - 1, then </s>): %r keeps %r; "
                    "further truncations are not reported",
                    self.text_length - 1,
                    caption,
                    kept,
                )
                self._reported_truncation = True
            ids = ids[: self.text_length - 1] + [self.eos_id]
            rows.append(ids + [self.pad_id] * (self.text_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """Embed captions: ``[B, text_length, d_model]`` in the encoder's dtype, on its device."""
        input_ids = self.tokenize(captions).to(self.transformer.device)
        # No attention mask: padding tokens are attended to, as in SAT's FrozenT5Embedder and diffusers'
        # CogVideoX pipeline; the DiT was trained on embeddings computed this way.
        return self.transformer(input_ids=input_ids).last_hidden_state
