"""
Content-Type detection for handler responses that set none.

A subset of the WHATWG MIME sniffing algorithm as Go's
``http.DetectContentType`` (which the reference relies on) implements it:
HTML only when the first bytes look like HTML, a few unmistakable binary
signatures, else UTF-8 text unless binary bytes occur.
"""

from __future__ import annotations

_WHITESPACE = b"\t\n\x0c\r "
_HTML_TAGS = (
    b"<!DOCTYPE HTML", b"<HTML", b"<HEAD", b"<SCRIPT", b"<IFRAME", b"<H1", b"<DIV",
    b"<FONT", b"<TABLE", b"<A", b"<STYLE", b"<TITLE", b"<B", b"<BODY", b"<BR", b"<P",
    b"<!--",
)  # fmt: skip
_SIGNATURES = (
    (b"%PDF-", "application/pdf"),
    (b"%!PS-Adobe-", "application/postscript"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"BM", "image/bmp"),
    (b"\x1f\x8b\x08", "application/x-gzip"),
    (b"PK\x03\x04", "application/zip"),
    (b"\x00asm", "application/wasm"),
    (b"\xfe\xff", "text/plain; charset=utf-16be"),
    (b"\xff\xfe", "text/plain; charset=utf-16le"),
    (b"\xef\xbb\xbf", "text/plain; charset=utf-8"),
)
_BINARY = (b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x0b\x0e\x0f\x10\x11\x12\x13"
           b"\x14\x15\x16\x17\x18\x19\x1a\x1c\x1d\x1e\x1f")  # fmt: skip
_MAGICS = tuple(magic for magic, _ in _SIGNATURES)


def sniff_content_type(data: bytes) -> str:
    """
    The Content-Type for a body starting with ``data`` (its first 512 bytes
    are considered).
    """
    head = data[:512]
    text = head.lstrip(_WHITESPACE)
    if text.startswith(b"<"):
        upper = text[:14].upper()
        for tag in _HTML_TAGS:
            if upper.startswith(tag) and len(text) > len(tag) and text[len(tag)] in b" >":
                return "text/html; charset=utf-8"
        if text.startswith(b"<?xml"):
            return "text/xml; charset=utf-8"
    if head.startswith(_MAGICS):
        for magic, kind in _SIGNATURES:
            if head.startswith(magic):
                return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if len(head.translate(None, _BINARY)) != len(head):  # a binary byte among them
        return "application/octet-stream"
    return "text/plain; charset=utf-8"
