"""Text from outside made safe for delivery status notifications (relay.delivery.dsn).

Pure. Everything taken from outside (the remote reply, host names, addresses) goes
through here before it is written into an NDR:

- `remote_text` decodes RFC 2047 encoded-words first (``=?utf-8?q?…?=``), then
  sanitizes (`sanitize_text`: control characters, CR and LF included, become spaces),
  then breaks any ``=?`` left over, so that no encoded-word reaches the report: a
  parser that decodes encoded-words in the delivery-status fields (Python's email
  package does) can never find a line break in a Diagnostic-Code, however the remote
  server encoded it (``=?utf-8?q?x=0D=0ABcc:_victim?=``, nested encodings included).
- `sanitize_text`: one header-like line, printable, bounded.
- addresses: RFC 6533 ``utf-8`` address type, as `utf-8-addr-xtext` (7-bit, for
  message/delivery-status) or `utf-8-addr-unitext` (UTF-8, for
  message/global-delivery-status); an ASCII address that holds ``=?`` is written in the
  escaped form as well, so that it cannot be read as an encoded-word.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re

MAX_DIAGNOSTIC = 900  # characters of remote text in one delivery-status field

_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
# RFC 2047 §2 encoded-word (with the RFC 2231 §5 language suffix); lenient on the text.
_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([QqBb])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"(?<=\?=)[ \t\r\n]+(?==\?)")  # RFC 2047 §6.2: ignored
_HEX = re.compile(r"=([0-9A-Fa-f]{2})")
MAX_ROUNDS = 4  # an encoded-word inside an encoded-word: decoded again, this often


def _decode_word(m: re.Match[str]) -> str:
    charset, kind, text = m.group(1), m.group(2).upper(), m.group(3)
    try:
        codecs.lookup(charset)
    except LookupError:
        charset = "utf-8"
    if kind == "B":
        try:
            raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            return m.group(0)
    else:
        raw = _HEX.sub(lambda h: chr(int(h.group(1), 16)), text.replace("_", " ")
                       ).encode("latin-1", "replace")
    try:
        return raw.decode(charset, "replace")
    except LookupError:  # pragma: no cover - lookup() above said it exists
        return raw.decode("utf-8", "replace")


def decode_encoded_words(text: str) -> str:
    """RFC 2047 encoded-words decoded (repeatedly, when decoding produced new ones)."""
    for _ in range(MAX_ROUNDS):
        if "=?" not in text:
            break
        decoded = _ENCODED_WORD.sub(_decode_word, _BETWEEN_WORDS.sub("", text))
        if decoded == text:
            break
        text = decoded
    return text


def break_encoded_words(text: str) -> str:
    """``=?`` becomes ``= ?``: an encoded-word has no space, so none is left."""
    while "=?" in text:
        text = text.replace("=?", "= ?")
    return text


def sanitize_text(value: str | bytes | None, *, limit: int = MAX_DIAGNOSTIC,
                  unicode: bool = False) -> str:
    """Remote text made safe for one header-like line.

    Bytes are decoded as UTF-8 (invalid sequences become ``?``). Runs of control
    characters and whitespace become one space. Other characters outside printable ASCII
    become ``?``, unless `unicode` (for the readable part and the global report), where
    printable non-ASCII characters are kept. At most `limit` characters; longer texts end
    with ``...``.
    """
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    value = _CONTROLS.sub(" ", value)
    out = []
    for ch in value:
        if " " <= ch <= "~":
            out.append(ch)
        elif unicode and ch.isprintable() and ch != "\ufffd":
            out.append(ch)
        else:
            out.append(" " if ch.isspace() else "?")
    text = " ".join("".join(out).split())
    if len(text) > limit:
        text = text[: max(limit - 3, 0)].rstrip() + "..."
    return text


def remote_text(value: str | bytes | None, *, limit: int = MAX_DIAGNOSTIC,
                unicode: bool = False) -> str:
    """Decode, then sanitize: a remote reply as one safe line (see the module docstring)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    # Cut generously first, so decoding cannot be made to work on megabytes.
    decoded = decode_encoded_words(value[: limit * 8])
    return sanitize_text(break_encoded_words(sanitize_text(decoded, limit=limit * 2,
                                                           unicode=unicode)),
                         limit=limit, unicode=unicode)


def cut_octets(text: str, max_octets: int) -> str:
    """`text` cut at a character boundary to at most `max_octets` octets of UTF-8."""
    raw = text.encode("utf-8")
    if len(raw) <= max_octets:
        return text
    return raw[:max_octets].decode("utf-8", "ignore")


def token(value: str | None, limit: int = 255) -> str:
    """A host name or id: no controls, no spaces, no encoded-word."""
    text = sanitize_text(value, limit=limit).replace(" ", "")
    return re.sub(r"=+\?", "?", text)


def clean_address(value: str, max_octets: int = 900) -> str:
    """An address with controls and spaces removed; non-ASCII kept (UTF-8 addresses);
    at most `max_octets` octets of UTF-8."""
    addr = "".join(sanitize_text(value, limit=max_octets, unicode=True).split())
    return cut_octets(addr, max_octets)


def encode_utf8_address(address: str, *, unitext: bool = False) -> str:
    """RFC 6533 utf-8-addr-xtext: ``\\x{HEX}`` for non-ASCII characters and ``+ = \\``;
    with `unitext` (utf-8-addr-unitext) printable non-ASCII characters stay as they are."""
    out = []
    for ch in address:
        o = ord(ch)
        if (0x21 <= o <= 0x7E and ch not in "+=\\") or (
                unitext and o > 0x7E and ch.isprintable()):
            out.append(ch)
        else:
            out.append(f"\\x{{{o:02X}}}")
    return "".join(out)


def decode_utf8_address(text: str) -> str:
    """The inverse of `encode_utf8_address`."""
    return re.sub(r"\\x\{([0-9A-Fa-f]{2,6})\}", lambda m: chr(int(m.group(1), 16)), text)


def address_field(address: str, budget: int = 960, *, unitext: bool = False) -> str:
    """``rfc822; a@b`` for ASCII addresses, ``utf-8; <xtext>`` (RFC 6533) otherwise
    (``utf-8; <unitext>`` with `unitext`, for message/global-delivery-status). An ASCII
    address holding ``=?`` takes the escaped form too (``=`` is ``\\x{3D}`` there).

    Cut (at a character boundary) to `budget` octets, so that the field line stays
    within 998 octets even for an absurdly long address.
    """
    addr = clean_address(address)
    if addr.isascii() and "=?" not in addr:
        return f"rfc822; {addr[: budget - 8]}"
    encoded = ""
    size = 0
    for ch in addr:
        piece = encode_utf8_address(ch, unitext=unitext)
        octets = len(piece.encode("utf-8"))
        if size + octets > budget - 7:
            break
        encoded += piece
        size += octets
    return f"utf-8; {encoded}"
