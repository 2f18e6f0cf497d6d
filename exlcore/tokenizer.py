"""Tokenizer from tokenizer.json (tokenizers) or tokenizer.model (sentencepiece), with the model's chat
template and BOS/EOS conventions from tokenizer_config.json and generation_config.json."""

import json
import re
from pathlib import Path

from exlcore import chat
from exlcore.errors import ExlError


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExlError(f"{path}: not valid JSON ({e}); restore the original file") from None


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, folder: Path, config: dict):
        folder = Path(folder)
        tc = _read_json(folder / "tokenizer_config.json")
        gen = _read_json(folder / "generation_config.json")
        self._special: dict[str, int] = {}
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self._tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # tokenizers raises plain Exception subclasses with a message
                raise ExlError(f"{folder / 'tokenizer.json'}: cannot be read ({e}); restore the original file") from None
            self._sp = None
            self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
            self._special = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        elif (folder / "tokenizer.model").is_file():
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor()
            try:
                self._sp.Load(str(folder / "tokenizer.model"))
            except (OSError, RuntimeError) as e:
                raise ExlError(f"{folder / 'tokenizer.model'}: cannot be read ({e}); restore the original file") from None
            self._tok = None
            self.vocab_size = self._sp.GetPieceSize()
            for i, t in (tc.get("added_tokens_decoder") or {}).items():
                if t.get("special"):
                    self._special[t["content"]] = int(i)
            self._special.update({self._sp.IdToPiece(i): i for i in range(self.vocab_size) if self._sp.IsControl(i)})
        else:
            raise ExlError(f"{folder}: no tokenizer.json or tokenizer.model; copy the model's tokenizer files here")

        self.bos_token = _token_text(tc.get("bos_token"))
        self.eos_token = _token_text(tc.get("eos_token"))
        self.bos_token_id = self._id(self.bos_token, config.get("bos_token_id"))
        self.eos_token_id = self._id(self.eos_token, config.get("eos_token_id"))
        # Stop ids: generation_config.json first (it may list several, e.g. <|eot_id|>), then config.json.
        eos = gen.get("eos_token_id", config.get("eos_token_id"))
        self.stop_ids = sorted({*([eos] if isinstance(eos, int) else eos or []),
                                *([self.eos_token_id] if self.eos_token_id is not None else [])})
        # Whether encode() starts with BOS: sentencepiece models (Llama 1/2, Gemma) do unless told not to;
        # tokenizer.json models follow their post-processor unless tokenizer_config.json asks for BOS.
        self.add_bos = bool(tc.get("add_bos_token", self._sp is not None))
        template = tc.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        self.chat_template: str | None = template
        self._special_re = (re.compile("(" + "|".join(map(re.escape, sorted(self._special, key=len, reverse=True))) + ")")
                            if self._special else None)

    def _id(self, text: str | None, fallback) -> int | None:
        if text is not None and text in self._special:
            return self._special[text]
        if text is not None and self._tok is not None and self._tok.token_to_id(text) is not None:
            return self._tok.token_to_id(text)
        if isinstance(fallback, list):
            fallback = fallback[0] if fallback else None
        return fallback

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Text -> ids. Special tokens written in the text (e.g. "<|im_start|>") become their ids.
        add_bos=None follows the model's convention; True/False forces it."""
        if self._tok is not None:
            ids = self._tok.encode(text, add_special_tokens=add_bos is not False).ids
        else:
            ids = []
            for piece in self._special_re.split(text) if self._special_re else [text]:
                if piece in self._special:
                    ids.append(self._special[piece])
                elif piece:
                    ids.extend(self._sp.EncodeAsIds(piece))
        want_bos = self.add_bos if add_bos is None else add_bos
        if want_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self._tok is not None:
            return self._tok.decode(ids, skip_special_tokens=skip_special)
        special = set(self._special.values())
        out, run = [], []
        for i in ids:
            if i in special:
                out.append(self._sp.DecodeIds(run))
                run = []
                if not skip_special:
                    out.append(self._sp.IdToPiece(i))
            else:
                run.append(i)
        return "".join(out) + self._sp.DecodeIds(run)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            template: str | None = None) -> str:
        """Render messages with the model's template (or `template`) to prompt text. Encode the result with
        add_bos=False: templates write their own BOS."""
        template = template or self.chat_template
        if template is None:
            raise ExlError("this model has no chat template; pass one as `template` (plugins.chat_templates() has some)")
        return chat.render(template, messages, add_generation_prompt,
                           bos_token=self.bos_token or "", eos_token=self.eos_token or "")
