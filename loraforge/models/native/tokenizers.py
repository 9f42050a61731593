"""Fast `tokenizer.json` files built from the tokenizers the old remote-code checkpoints ship.

* SentencePiece BPE (`tokenizer.model`: ChatGLM2/3, Baichuan/Baichuan2) → a `tokenizers` BPE with byte fallback
  and the same pieces at the same ids; merges come from the piece scores, as SentencePiece's BPE applies them.
* tiktoken ranks (`qwen.tiktoken`: Qwen-1) → a byte-level BPE with Qwen-1's split pattern and its special tokens.

Control tokens that the original tokenizer only emits from its own prompt builder (ChatGLM's `[gMASK]`, `sop`,
`<|user|>` …) get a content that text typed by a user never contains (`CONTROL_MARK` + name), so typed
"<|user|>" stays plain text as in the original while the chat template can still emit the control token.
"""

from __future__ import annotations

import base64
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

# A private-use character: text from users, documents or models does not contain it.
CONTROL_MARK = "\ue000"

# SentencePiece piece types (sentencepiece_model.proto)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def control(name: str) -> str:
    """The content of a control token that only the chat template emits."""
    return CONTROL_MARK + name


@dataclass
class SpmTokenizer:
    """What a SentencePiece model gives: the backend tokenizer and its special pieces."""

    tokenizer: object  # tokenizers.Tokenizer
    pieces: list[str]
    unk: str
    control_pieces: dict[int, str] = field(default_factory=dict)


def _spm_proto(model_file: Path):
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    return proto


def sentencepiece_bpe(model_file: Path, *, controls_parse_in_text: bool) -> SpmTokenizer:
    """A fast tokenizer equal to SentencePiece BPE `model_file` on every text.

    controls_parse_in_text: Baichuan's slow tokenizer turns `<s>`, `</s>`, `<unk>` typed in text into the control
    ids; ChatGLM's keeps them as text (their names then get CONTROL_MARK so nothing typed can produce them).
    User-defined symbols (type 4) are matched anywhere in the normalized text, as SentencePiece does.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    proto = _spm_proto(model_file)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.model_type != 2:
        raise ValueError(f"{model_file}: SentencePiece model type {spec.model_type} (only BPE, type 2, is converted)")
    if norm.name not in ("identity", "") or norm.remove_extra_whitespaces or spec.treat_whitespace_as_suffix:
        raise ValueError(f"{model_file}: normalizer {norm.name!r} / remove_extra_whitespaces / whitespace-as-suffix "
                         "are not converted")
    pieces, kinds, controls = [], [], {}
    for i, p in enumerate(proto.pieces):
        name = p.piece
        if p.type in (_CONTROL, _UNKNOWN) and not controls_parse_in_text:
            name = control(name)
        if p.type in (_CONTROL, _UNKNOWN):
            controls[i] = name
        pieces.append(name)
        kinds.append(p.type)
    vocab = {name: i for i, name in enumerate(pieces)}
    # SentencePiece BPE merges, at each step, the adjacent pair whose concatenation is the highest-scored piece;
    # only normal pieces are ever built from parts.
    normal = {name for name, kind in zip(pieces, kinds) if kind == _NORMAL}
    scored = sorted(((proto.pieces[i].score, -i, name) for i, name in enumerate(pieces) if kinds[i] == _NORMAL),
                    reverse=True)
    merges = []
    for _, _, name in scored:
        splits = [(name[:k], name[k:]) for k in range(1, len(name)) if name[:k] in normal and name[k:] in normal]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend(splits)
    unk = pieces[spec.unk_id]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=spec.byte_fallback, fuse_unk=True))
    steps = [normalizers.Prepend("▁")] if norm.add_dummy_prefix else []
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    added = []
    for i, name in enumerate(pieces):
        if kinds[i] == _USER_DEFINED:
            added.append(AddedToken(name, normalized=True, special=False))
        elif i in controls and controls_parse_in_text:
            added.append(AddedToken(name, normalized=False, special=True))
    if added:
        tok.add_tokens(added)
    return SpmTokenizer(tok, pieces, unk, controls)


def add_control_tokens(tok, names: list[str], first_id: int) -> dict[str, int]:
    """Append control tokens at `first_id`, `first_id + 1`, … (ChatGLM's ids after the SentencePiece pieces)."""
    from tokenizers import AddedToken

    if tok.get_vocab_size(with_added_tokens=True) != first_id:
        raise ValueError(f"control tokens must start at id {first_id}, the vocabulary has "
                         f"{tok.get_vocab_size(with_added_tokens=True)} entries")
    tok.add_special_tokens([AddedToken(control(n), normalized=False, special=True) for n in names])
    return {n: first_id + k for k, n in enumerate(names)}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """`base64-token rank` per line (the tiktoken file format), without importing tiktoken."""
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def tiktoken_bpe(path: Path, pattern: str, specials: dict[str, int]):
    """A byte-level BPE equal to tiktoken's encoding of `path` with split regex `pattern` and `specials`
    (content → id), NFC-normalized as Qwen-1's tokenizer does."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    ranks = read_tiktoken_ranks(path)
    table = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(table[x] for x in b)

    vocab = {text(b): r for b, r in ranks.items()}
    merges = []
    for b, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(b[:k], b[k:]) for k in range(1, len(b)) if b[:k] in ranks and b[k:] in ranks]
        splits.sort(key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
        merges.extend((text(lft), text(rgt)) for lft, rgt in splits)
    # tiktoken takes a whole pre-token that is itself a token without merging (ignore_merges).
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    ordered = sorted(specials.items(), key=lambda kv: kv[1])
    if ordered and ordered[0][1] != tok.get_vocab_size(with_added_tokens=True):
        raise ValueError(f"special tokens must start at id {tok.get_vocab_size(with_added_tokens=True)}")
    tok.add_special_tokens([AddedToken(c, normalized=False, special=True) for c, _ in ordered])
    return tok


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def save_fast_tokenizer(tok, out: Path, *, chat_template: str, padding_side: str, model_max_length: int,
                        special: dict[str, str | None], post_prefix: list[tuple[str, int]] | None = None) -> None:
    """Write tokenizer.json + tokenizer_config.json (a PreTrainedTokenizerFast) into `out`.

    special: bos/eos/unk/pad token contents (None leaves one unset). post_prefix: tokens `tokenizer(text)` puts
    before the text (ChatGLM's `[gMASK] sop`).
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    if post_prefix:
        names = " ".join(c for c, _ in post_prefix)
        tok.post_processor = processors.TemplateProcessing(single=f"{names} $A", pair=f"{names} $A $B",
                                                           special_tokens=post_prefix)
    kwargs = {k: v for k, v in special.items() if v is not None}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side=padding_side,
                                   model_max_length=model_max_length, clean_up_tokenization_spaces=False,
                                   chat_template=chat_template, **kwargs)
    fast.save_pretrained(out)
