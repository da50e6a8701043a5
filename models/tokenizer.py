"""A HF checkpoint's tokenizer (tokenizer.json) and chat template (tokenizer_config.json)."""

from __future__ import annotations

import json
import pathlib

import jinja2
import tokenizers


class Tokenizer:
  """Encodes text and chat messages; decodes ids. No BOS is added unless the config asks."""

  def __init__(self, directory: str | pathlib.Path):
    directory = pathlib.Path(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
      raise FileNotFoundError(f"{directory}: no tokenizer.json")
    self._tok = tokenizers.Tokenizer.from_file(str(path))
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    self.bos_token = cfg.get("bos_token")
    self.eos_token = cfg.get("eos_token")
    self.add_bos = bool(cfg.get("add_bos_token", False))
    template = cfg.get("chat_template")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    self._template = env.from_string(template) if template else None

  def encode(self, text: str) -> list[int]:
    ids = self._tok.encode(text, add_special_tokens=False).ids
    if self.add_bos and self.bos_token is not None:
      ids = [self._tok.token_to_id(self.bos_token)] + ids
    return ids

  def decode(self, ids) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=True)

  def chat(self, user_message: str) -> list[int]:
    """Token ids of a one-turn chat, with the generation prompt for the assistant."""
    if self._template is None:
      raise ValueError("this tokenizer has no chat_template in tokenizer_config.json")
    text = self._template.render(
        messages=[{"role": "user", "content": user_message}], add_generation_prompt=True,
        bos_token=self.bos_token or "", eos_token=self.eos_token or "")
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return ids
