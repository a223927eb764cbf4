"""A language model's tokenizer as its folder describes it: ``tokenizer.json`` (read by
``tokenizers``), the special tokens and flags of ``tokenizer_config.json``, and the chat template.

It reads the folder the way transformers' fast tokenizer does, so ids, decoded text and chat
prompts match it: named special tokens missing from the vocabulary are added, named and extra
special tokens become special added tokens (dropped by ``skip_special_tokens``), and BOS/EOS are
what ``tokenizer.json``'s post-processor adds (transformers 5 ignores the config's
``add_bos_token``/``add_eos_token`` too). Batches are padded on the left, the side generation
needs (every row's last token is then at the same position).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from vlkit.errors import MissingPart, VlkitError
from vlkit.text.chat_template import TEMPLATE_FILES, ChatTemplate

NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
"""The special-token roles transformers names; a config may add more (``image_token``, ...)."""


class LMTokenizer:
    """Text ↔ ids for a language model, its special tokens and its chat template."""

    def __init__(self, tok: HFTokenizer, special_tokens: dict[str, str], chat_template: ChatTemplate | None = None,
                 clean_up_spaces: bool = False, origin: str = "tokenizer", trained_template: str | None = None):
        self.backend = tok
        self.special_tokens = dict(special_tokens)
        self.chat_template = chat_template
        self.trained_template = trained_template
        """The built-in conversation template (``llava_v1``, ...) a VLM was trained with where it renders
        other ids than ``chat_template``: what its prompts use (``tokenizer_config.json``'s ``vlkit_template``)."""
        self.clean_up_spaces = clean_up_spaces and type(tok.model).__name__ != "BPE"
        self.origin = origin
        tok.no_padding()
        tok.no_truncation()
        ids = tok.get_vocab(with_added_tokens=True).values()
        self.vocab_size = max(ids) + 1 if ids else 0
        """Rows an embedding matrix needs: the highest id plus one (ids need not be contiguous)."""

    @classmethod
    def from_folder(cls, folder: str | Path) -> "LMTokenizer":
        """``tokenizer.json`` with ``tokenizer_config.json`` (and the legacy ``special_tokens_map.json``)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise MissingPart(f"{folder}: no tokenizer.json; this model folder has no tokenizer")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as err:  # noqa: BLE001 - the Rust side raises plain Exceptions
            raise VlkitError(f"{path}: not a readable tokenizer.json ({err})") from None
        config = _read_object(folder / "tokenizer_config.json")
        legacy = _read_object(folder / "special_tokens_map.json")
        named = _named_tokens({**legacy, **config}, folder)
        _add_declared_tokens(tok, config, folder)
        _add_special_tokens(tok, [*named.values(), *_extra_tokens({**legacy, **config})])
        special = {name: _content(value) for name, value in named.items()}
        if config.get("split_special_tokens"):
            tok.encode_special_tokens = True
        trained = config.get("vlkit_template")
        if trained is not None and not isinstance(trained, str):
            raise VlkitError(f"{folder / 'tokenizer_config.json'}: vlkit_template {trained!r}; expected a template's name")
        return cls(tok, special, ChatTemplate.from_folder(folder, config),
                   clean_up_spaces=bool(config.get("clean_up_tokenization_spaces")), origin=str(folder), trained_template=trained)

    def save(self, folder: str | Path) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja`` (the files
        transformers 5 writes), from which this class and transformers read the same tokenizer back."""
        folder = Path(folder)
        self.backend.save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens,
                  "clean_up_tokenization_spaces": self.clean_up_spaces}
        if self.trained_template is not None:
            config["vlkit_template"] = self.trained_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if self.chat_template is not None:
            (folder / "chat_template.jinja").write_text(self.chat_template.source, encoding="utf-8")

    def __getstate__(self) -> dict:
        """Picklable (DataLoader workers under spawn): the compiled chat template travels as its source."""
        state = dict(self.__dict__)
        if self.chat_template is not None:
            state["chat_template"] = (self.chat_template.source, self.chat_template.origin)
        return state

    def __setstate__(self, state: dict) -> None:
        if state["chat_template"] is not None:
            state["chat_template"] = ChatTemplate(*state["chat_template"])
        self.__dict__.update(state)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"LMTokenizer({self.origin!r}, vocab_size={self.vocab_size})"

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self.backend.id_to_token(idx)

    def _role_id(self, role: str) -> int | None:
        token = self.special_tokens.get(role)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._role_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._role_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._role_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._role_id("unk_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, texts: str | list[str], add_special_tokens: bool = True) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` ``[B, longest]``, padded on the left. Without a pad token
        the padding id is the EOS id (the mask, not the id, is what the model reads)."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        return left_pad(rows, self.padding_id())

    def padding_id(self) -> int:
        for idx in (self.pad_token_id, self.eos_token_id):
            if idx is not None:
                return idx
        return 0

    def decode(self, token_ids, skip_special_tokens: bool = False) -> str:
        """Text of ``token_ids`` (a list, or a 1-D tensor)."""
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        text = self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self.clean_up_spaces else text

    def batch_decode(self, rows, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in rows]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
        """The prompt text the model's chat template makes of ``messages`` (each ``{"role", "content"}``).
        ``add_generation_prompt`` (default on, since vlkit renders prompts to answer) opens the
        assistant's turn; ``tools``, ``documents`` and other ``variables`` go to the template."""
        if self.chat_template is None:
            raise MissingPart(f"{self.origin}: no chat template (looked for one in {', '.join(TEMPLATE_FILES)})")
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt,
                                         special_tokens=self.special_tokens, **variables)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> list[int]:
        """Ids of :meth:`apply_chat_template`'s text; the template writes BOS itself, so the
        post-processor's special tokens are not added again (as transformers does)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **variables), add_special_tokens=False)


def left_pad(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of ids → ``input_ids`` and ``attention_mask`` padded on the left to the longest row."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _read_object(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise VlkitError(f"{path}: malformed JSON ({err})") from None
    if not isinstance(data, dict):
        raise VlkitError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _content(value) -> str:
    return value["content"] if isinstance(value, dict) else value


def _is_token(value) -> bool:
    return isinstance(value, str) or (isinstance(value, dict) and isinstance(value.get("content"), str))


def _named_tokens(config: dict, folder: Path) -> dict[str, str | dict]:
    """``bos_token`` … ``mask_token`` and any other ``*_token`` entry (``image_token``, ...), as transformers names them."""
    named = {k: v for k, v in config.items() if k.endswith("_token") and _is_token(v)}
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):
        named.update({k: v for k, v in extra.items() if _is_token(v)})
    for key in NAMED_TOKENS:
        if config.get(key) is not None and key not in named:
            raise VlkitError(f"{folder / 'tokenizer_config.json'}: {key} must be a string or an object with "
                             f"'content', got {config[key]!r}")
    return named


def _extra_tokens(config: dict) -> list[str | dict]:
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    return [t for t in extra if _is_token(t)] if isinstance(extra, list) else []


def _added_token(value, special: bool) -> AddedToken:
    if isinstance(value, str):
        return AddedToken(value, special=special)
    fields = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
    return AddedToken(value["content"], special=value.get("special", special), **fields)


def _add_declared_tokens(tok: HFTokenizer, config: dict, folder: Path) -> None:
    """``added_tokens_decoder`` entries ``tokenizer.json`` lacks, each at the id the config gives it."""
    declared = config.get("added_tokens_decoder") or {}
    known = {t.content for t in tok.get_added_tokens_decoder().values()}
    for idx, value in sorted(declared.items(), key=lambda kv: int(kv[0])):
        if not _is_token(value) or _content(value) in known:
            continue
        tok.add_tokens([_added_token(value, special=bool(value.get("special")))])
        got = tok.token_to_id(_content(value))
        if got != int(idx):
            raise VlkitError(f"{folder / 'tokenizer_config.json'}: added token {_content(value)!r} is declared at id {idx} "
                             f"but tokenizer.json places it at {got}")


def _add_special_tokens(tok: HFTokenizer, values: list) -> None:
    """Special tokens the config names but ``tokenizer.json`` does not list as added tokens become
    special added tokens (new ids when not in the vocabulary), as transformers does."""
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    new = []
    for value in values:
        if _content(value) not in added:
            new.append(_added_token(value, special=True))
            added.add(_content(value))
    if new:
        tok.add_tokens(new)


def _clean_up_spaces(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (word-piece tokenizers that ask for it)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text
