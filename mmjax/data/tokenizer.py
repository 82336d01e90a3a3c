"""Tokenizers: tiny built-in vocabularies (characters, or words of the shapes grammar), or a
local Hugging Face tokenizer dir.

Both expose one interface:

  encode(text) -> list[int]              no special tokens; `<image>` / `<video>` -> image_id / video_id
  decode(ids) -> str                     special tokens dropped
  encode_chat(messages) -> (ids, mask)   mask = 1 on assistant-turn tokens
  encode_chat_prompt(messages) -> ids    what precedes the next assistant turn (sampling)
  vocab_size, pad_id, bos_id (or None), eos_id

A Hugging Face directory is read with the `tokenizers` package (`tokenizer.json`) plus
`tokenizer_config.json` / `special_tokens_map.json` for special tokens and the chat
template, which is rendered with jinja2 the way transformers renders it. Nothing is
downloaded: `load_tokenizer` only reads local files.
"""
from __future__ import annotations

import json
import os
import re
import string

BUILTIN = "builtin"
BUILTIN_WORDS = "builtin_words"
BUILTINS = (BUILTIN, BUILTIN_WORDS)

# Fallback chat layout when a tokenizer has no chat template: "role: content\n" per turn;
# the assistant's content and its closing newline carry loss.
_FALLBACK_ROLE_SEP = ": "
_FALLBACK_TURN_END = "\n"


def load_tokenizer(spec: str):
  """`'builtin'` (characters), `'builtin_words'` (words of the shapes grammar, characters
  for anything else) or a local directory holding a Hugging Face `tokenizer.json`."""
  if spec == BUILTIN:
    return BuiltinTokenizer()
  if spec == BUILTIN_WORDS:
    return BuiltinWordTokenizer()
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"tokenizer {spec!r} is not valid; expected 'builtin', 'builtin_words' or a directory "
                     "with tokenizer.json")
  if not os.path.isdir(spec):
    raise ValueError(f"tokenizer directory {spec} does not exist; expected 'builtin', 'builtin_words' or a local "
                     "directory with tokenizer.json (nothing is downloaded)")
  path = os.path.join(spec, "tokenizer.json")
  if not os.path.isfile(path):
    raise ValueError(f"tokenizer directory {spec} has no tokenizer.json; expected a Hugging Face "
                     "fast-tokenizer file (save one with tokenizer.save_pretrained(dir))")
  return HFTokenizer(spec)


class BuiltinTokenizer:
  """Character-level vocabulary for the generated tasks (see `sources.GeneratedTask`).

  Ids: 0 <pad>, 1 <bos>, 2 <eos>, 3 <unk>, 4 <sep>, 5 <image> (visual placeholder), then digits, lowercase letters, space,
  punctuation and newline. Characters outside the vocabulary encode to <unk>.
  """

  SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>", "<sep>", "<image>")
  CHARS = string.digits + string.ascii_lowercase + " =+-:,.>|?!'()\n"
  MARKERS = re.compile(r"(<image>|<video>)")  # media markers in text: both encode to the placeholder

  def __init__(self):
    self.pad_id, self.bos_id, self.eos_id, self.unk_id, self.sep_id, self.image_id = range(len(self.SPECIALS))
    self.video_id = self.image_id  # one placeholder for images and videos
    self._to_id = {c: i + len(self.SPECIALS) for i, c in enumerate(self.CHARS)}
    self._to_char = {i: c for c, i in self._to_id.items()}
    self.vocab_size = len(self.SPECIALS) + len(self.CHARS)
    self.chat_template = None

  def encode(self, text: str) -> list[int]:
    ids = []
    for i, part in enumerate(self.MARKERS.split(text)):  # odd parts are markers
      ids += [self.image_id] if i % 2 else self._encode_text(part)
    return ids

  def _encode_text(self, text: str) -> list[int]:
    return [self._to_id.get(c, self.unk_id) for c in text]

  def decode(self, ids) -> str:
    return "".join(self._to_char.get(int(i), "") for i in ids)

  def encode_chat(self, messages) -> tuple[list[int], list[int]]:
    return _fallback_chat(self, messages)

  def encode_chat_prompt(self, messages) -> list[int]:
    return _fallback_chat_prompt(self, messages)

  def __repr__(self):
    return f"BuiltinTokenizer(vocab_size={self.vocab_size})"


class BuiltinWordTokenizer(BuiltinTokenizer):
  """The character vocabulary plus one id per word of the shapes grammar (`WORDS`), with and
  without a leading space, so a shapes caption takes about one token per word ("a small red
  circle at the top." -> a, ' small', ' red', ' circle', ' at', ' the', ' top', '.').

  Lossless over the character set: text is cut into pieces ` ?[a-z]+` and single other
  characters; a piece in the vocabulary is one id, any other is spelled out by characters.
  Ids below the character tokenizer's `vocab_size` mean the same characters in both.
  """

  WORDS = (
      # shapes vocabulary (mmjax.data.shapes)
      "square", "circle", "triangle", "diamond", "cross", "squares", "circles", "triangles", "diamonds",
      "crosses", "red", "green", "blue", "yellow", "purple", "white", "cyan", "pink", "small", "large",
      "top", "left", "right", "bottom", "center", "appears", "moves", "disappears",
      # grammar and questions
      "a", "an", "the", "at", "to", "from", "first", "then", "and", "describe", "image", "video", "what",
      "colour", "shape", "size", "is", "are", "there", "how", "many", "where", "object", "yes", "no", "of",
      "in", "frame", "step")

  def __init__(self):
    super().__init__()
    pieces = [w for word in self.WORDS for w in (word, " " + word)]
    base = self.vocab_size
    self._word_to_id = {w: base + i for i, w in enumerate(pieces)}
    self._id_to_word = {i: w for w, i in self._word_to_id.items()}
    self.vocab_size = base + len(pieces)

  _PIECE = re.compile(r" ?[a-z]+|.", re.S)

  def _encode_text(self, text: str) -> list[int]:
    ids = []
    for piece in self._PIECE.findall(text):
      i = self._word_to_id.get(piece)
      ids += [i] if i is not None else super()._encode_text(piece)
    return ids

  def decode(self, ids) -> str:
    return "".join(self._id_to_word.get(int(i)) or self._to_char.get(int(i), "") for i in ids)

  def __repr__(self):
    return f"BuiltinWordTokenizer(vocab_size={self.vocab_size})"


def _fallback_chat(tok, messages) -> tuple[list[int], list[int]]:
  ids, mask = [], []
  for m in _check_messages(messages):
    head = tok.encode(m["role"] + _FALLBACK_ROLE_SEP)
    body = tok.encode(m["content"] + _FALLBACK_TURN_END)
    on = int(m["role"] == "assistant")
    ids += head + body
    mask += [0] * len(head) + [on] * len(body)
  return ids, mask


def _fallback_chat_prompt(tok, messages) -> list[int]:
  ids = _fallback_chat(tok, messages)[0] if messages else []
  return ids + tok.encode("assistant" + _FALLBACK_ROLE_SEP)


def _check_messages(messages):
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}")
  for m in messages:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
      raise ValueError(f"each message must be a dict with string 'role' and 'content', got {m!r:.80}")
  return messages


def _token_str(value):
  """Special tokens in tokenizer_config.json are strings or AddedToken dicts."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


class HFTokenizer:
  """A local Hugging Face fast tokenizer (`tokenizer.json` + optional configs)."""

  def __init__(self, path: str):
    import tokenizers  # an install requirement

    self.path = path
    try:
      self._tok = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    except Exception as e:  # noqa: BLE001 - the library raises a bare Exception
      raise ValueError(f"tokenizer {path}/tokenizer.json could not be read: {str(e).splitlines()[0]}") from None
    cfg = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later wins
      file = os.path.join(path, name)
      if os.path.isfile(file):
        with open(file) as f:
          cfg.update(json.load(f))
    self.special_tokens = {k: _token_str(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    self.bos_id = self._id(self.special_tokens["bos_token"])
    self.eos_id = self._id(self.special_tokens["eos_token"])
    if self.eos_id is None:
      raise ValueError(f"tokenizer {path} names no eos_token (in tokenizer_config.json or "
                       "special_tokens_map.json) that is in its vocabulary; one is needed to end sequences")
    pad = self._id(self.special_tokens["pad_token"])
    self.pad_id = self.eos_id if pad is None else pad  # padding is masked out, any id works
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    # Placeholders of visual tokens in VLM inputs (LLaVA convention); None if the vocabulary has none.
    self.image_id = self._id(cfg.get("image_token") if isinstance(cfg.get("image_token"), str) else "<image>")
    self.video_id = self._id(cfg.get("video_token") if isinstance(cfg.get("video_token"), str) else "<video>")
    self.chat_template = self._read_chat_template(cfg)
    self._template = None

  def _id(self, token):
    return None if token is None else self._tok.token_to_id(token)

  def _read_chat_template(self, cfg):
    file = os.path.join(self.path, "chat_template.jinja")  # transformers >= 4.43 layout
    if os.path.isfile(file):
      with open(file) as f:
        return f.read()
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
      named = {t.get("name"): t.get("template") for t in template}
      template = named.get("default", next(iter(named.values()), None))
    return template

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def render_chat(self, messages, add_generation_prompt: bool = False) -> str:
    """The chat template applied to `messages`, as text (like transformers' apply_chat_template)."""
    if self._template is None:
      self._template = _compile_template(self.chat_template, self.path)
    return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                 **{k: v for k, v in self.special_tokens.items() if v is not None})

  def encode_chat(self, messages) -> tuple[list[int], list[int]]:
    """Chat-template tokens; mask = 1 on tokens rendered for assistant turns.

    An assistant turn's span is the text the template adds when that turn is appended to
    the conversation rendered with a generation prompt, so role headers stay unmasked and
    end-of-turn markers are learned.
    """
    messages = _check_messages(messages)
    if not self.chat_template:
      return _fallback_chat(self, messages)
    full = self.render_chat(messages)
    spans = []
    for i, m in enumerate(messages):
      if m["role"] != "assistant":
        continue
      before = self.render_chat(messages[:i], add_generation_prompt=True) if i else ""
      upto = self.render_chat(messages[:i + 1])
      start = _common_prefix(before, upto)
      spans.append((start, len(upto)))
    enc = self._tok.encode(full, add_special_tokens=False)
    mask = [int(any(s <= a < e for s, e in spans)) if b > a else 0 for a, b in enc.offsets]
    return list(enc.ids), mask

  def encode_chat_prompt(self, messages) -> list[int]:
    """Tokens that ask for the next assistant turn after `messages` (for sampling)."""
    if not self.chat_template:
      return _fallback_chat_prompt(self, messages)
    return self.encode(self.render_chat(messages, add_generation_prompt=True))

  def __getstate__(self):  # Grain workers pickle the tokenize function; templates don't pickle
    return dict(self.__dict__, _template=None)

  def __repr__(self):
    return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def _common_prefix(a: str, b: str) -> int:
  n = min(len(a), len(b))
  if a[:n] == b[:n]:
    return n
  i = 0
  while i < n and a[i] == b[i]:
    i += 1
  return i


def _compile_template(source: str, path: str):
  """Compiles a chat template with the same jinja2 settings transformers uses."""
  try:
    import jinja2
    import jinja2.ext
    from jinja2 import sandbox
  except ImportError:
    raise ValueError(f"tokenizer {path} has a chat template, which needs jinja2: pip install jinja2") from None

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  try:
    return env.from_string(source)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise ValueError(f"tokenizer {path} chat template does not compile: {e}") from None
