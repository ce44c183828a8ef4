"""Byte-span alignment of one completion under two tokenizers (a teacher of another family).

The student's sampled ids are never re-tokenised: their byte spans come from decoding them
incrementally (the text of ids[:k] for every k), so a token that holds only part of a UTF-8
character is seen as such (its end falls inside a character and can close no chunk). The teacher
tokenises the completion's text with its own tokenizer; its spans come the same way, and its ids
must decode back to exactly that text, or the row is dropped (counted, never guessed).

A chunk closes wherever a student boundary and a teacher boundary fall on the same byte; the
student's end of turn and the teacher's end-of-turn token(s) form a final chunk of their own.
With one tokenizer every chunk is one token on each side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole character


class AlignmentError(ValueError):
    """A row that cannot be aligned; the message is its reason (counted, the row gets no signal)."""


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _gpt2_byte_map() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in kept:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_MAP = _gpt2_byte_map()
_BYTE_LEVEL: dict[int, bool] = {}  # id(backend tokenizer) -> whether its decoder is byte-level


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    if id(backend) not in _BYTE_LEVEL:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
        kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", []) or []]
        _BYTE_LEVEL[id(backend)] = "ByteLevel" in kinds
    return _BYTE_LEVEL[id(backend)]


def raw_bytes(tokenizer, token_id: int) -> bytes | None:
    """The bytes a token stands for where the tokenizer says so exactly: a byte-fallback token
    (`<0xE2>`) or a byte-level BPE token; None otherwise (its bytes are only known by decoding)."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    if not isinstance(token, str):
        return None
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            return None
    if _is_byte_level(tokenizer) and all(c in _BYTE_MAP for c in token):
        return bytes(_BYTE_MAP[c] for c in token)
    return None


def byte_ends(tokenizer, ids: list[int], raw=raw_bytes) -> tuple[str, list[float]]:
    """(text, ends): the text of `ids` and, for each token, the byte offset where it ends in the
    text's UTF-8 encoding. A token that ends inside a character ends at an exact byte when the bytes
    of the tokens since the last whole character are known (`raw`: byte-level and byte-fallback
    tokens); otherwise at that character's first byte + 0.5, which can coincide with no boundary. A
    trailing partial character (a completion cut in the middle of one) is not part of the text;
    its tokens end past the text's length."""
    prefixes = tokenizer.batch_decode([ids[:k] for k in range(1, len(ids) + 1)], skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False) if ids else []
    full = prefixes[-1] if prefixes else ""
    text = full.rstrip(REPLACEMENT)
    if REPLACEMENT in text:
        raise AlignmentError("the text holds bytes that are not UTF-8 (a U+FFFD inside it)")
    encoded = text.encode("utf-8")
    ends, whole, since = [], 0, b""  # `whole`: the end of the last whole character; `since`: bytes after it
    for k, prefix in enumerate(prefixes):
        stable = prefix.rstrip(REPLACEMENT)
        if not text.startswith(stable):
            raise AlignmentError("decoding the ids one more at a time does not extend the text (the decoder "
                                 "rewrites earlier characters)")
        end = len(stable.encode("utf-8"))
        if len(stable) == len(prefix):
            ends.append(float(end))
            whole, since = end, b""
            continue
        # the token ends inside the next character
        piece = raw(tokenizer, ids[k]) if since is not None else None
        if piece is None or not 0 <= end - whole <= len(since + piece):
            since = None
        else:  # the known bytes since the last whole character, less those now in whole characters
            since, whole = (since + piece)[end - whole:], end
        if since and encoded[whole:whole + len(since)] == since and whole + len(since) < len(encoded):
            ends.append(float(whole + len(since)))
        else:
            ends.append(end + 0.5 if end < len(encoded) else len(encoded) + 0.5)
    return text, ends


def teacher_text_ids(tokenizer, text: str) -> tuple[list[int], list[float]]:
    """The teacher's tokens of `text` (no special tokens added) and their byte ends; the ids must
    decode back to exactly `text` (AlignmentError otherwise)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    decoded, ends = byte_ends(tokenizer, ids)
    if decoded != text or _decode(tokenizer, ids) != text:
        raise AlignmentError("the teacher's tokens do not decode back to the completion's text")
    return ids, ends


@dataclass
class RowAlignment:
    """Chunk indices of one row's completion tokens on both sides."""

    student_chunk: list[int]  # per student completion token
    teacher_ids: list[int]  # the teacher's completion: the text's tokens, then its end of turn
    teacher_chunk: list[int]  # per teacher completion token
    chunks: int

    def sizes(self) -> list[tuple[int, int]]:
        """(student tokens, teacher tokens) of every chunk."""
        out = [[0, 0] for _ in range(self.chunks)]
        for c in self.student_chunk:
            out[c][0] += 1
        for c in self.teacher_chunk:
            out[c][1] += 1
        return [tuple(pair) for pair in out]


def chunk_of(ends: list[float], closing: list[int]) -> list[int]:
    """The chunk of each token: how many closing boundaries lie strictly before its end."""
    out, c = [], 0
    for end in ends:
        while c < len(closing) and closing[c] < end:
            c += 1
        out.append(c)
    return out


def align(student_ends: list[float], teacher_ends: list[float]) -> tuple[list[int], list[int], int]:
    """Chunks of two tokenizations of one text: a chunk closes at every byte where both have a
    token boundary. Returns (student chunk per token, teacher chunk per token, number of chunks)."""
    both = sorted({int(e) for e in student_ends if e == int(e)} & {int(e) for e in teacher_ends if e == int(e)})
    closing = [b for b in both if b > 0]
    student, teacher = chunk_of(student_ends, closing), chunk_of(teacher_ends, closing)
    chunks = max(student + teacher, default=-1) + 1
    return student, teacher, chunks


def align_row(student_tokenizer, teacher_tokenizer, completion_ids: list[int], ends_turn: bool,
              teacher_end_ids: list[int]) -> RowAlignment:
    """Align one completion. `ends_turn`: its last id is the student's end of turn (EOS), which maps
    to `teacher_end_ids` as a chunk of its own; the other ids are text."""
    text_ids = completion_ids[:-1] if ends_turn else completion_ids
    special = set(student_tokenizer.all_special_ids)
    if any(i in special for i in text_ids):
        raise AlignmentError("a special token inside the completion (its text is no text to the teacher)")
    text, s_ends = byte_ends(student_tokenizer, text_ids)
    t_ids, t_ends = teacher_text_ids(teacher_tokenizer, text)
    student, teacher, chunks = align(s_ends, t_ends)
    if ends_turn:
        student.append(chunks)
        teacher += [chunks] * len(teacher_end_ids)
        t_ids = t_ids + list(teacher_end_ids)
        chunks += 1
    return RowAlignment(student, t_ids, teacher, chunks)


# --- the teacher's side of the conversation ---

_MARK = "\u2063OPD-END-MARK\u2063"


def end_of_turn_ids(tokenizer) -> list[int]:
    """The teacher's token(s) that end an assistant turn: what its chat template writes after the
    turn's content, up to and including the first special token (e.g. Gemma's `<end_of_turn>`);
    without a template, its EOS token."""
    if getattr(tokenizer, "chat_template", None):
        conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARK}]
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
        if _MARK in rendered:
            suffix = rendered.split(_MARK, 1)[1]
            specials = sorted(set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {})),
                              key=len, reverse=True)
            found = [(suffix.find(s), s) for s in specials if s and s in suffix]
            if found:
                position, token = min(found, key=lambda f: (f[0], -len(f[1])))
                return list(tokenizer(suffix[:position + len(token)], add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is None:
        raise AlignmentError("the teacher's tokenizer has neither a chat template nor an EOS token to end a turn with")
    return [tokenizer.eos_token_id]


def teacher_prompt_ids(tokenizer, record: dict | None, student_text: str) -> list[int]:
    """The prompt as the teacher sees it: a record's `messages` under the teacher's own chat
    template (with its generation prompt); a raw `prompt` string tokenised as the teacher would;
    otherwise (a teacher without a template) the student's rendered prompt as plain text."""
    record = record or {}
    if record.get("messages") and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True, tokenize=True,
                                                return_dict=True)
        return list(encoded["input_ids"])
    if isinstance(record.get("prompt"), str):
        return list(tokenizer(record["prompt"])["input_ids"])
    return list(tokenizer(student_text)["input_ids"])
