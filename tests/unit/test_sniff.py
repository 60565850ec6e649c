"""Tests for kapow.core.sniff: the Content-Type of a response that sets none."""

import pytest

from kapow.core.sniff import sniff_content_type

TEXT = "text/plain; charset=utf-8"
HTML = "text/html; charset=utf-8"
BINARY = "application/octet-stream"


@pytest.mark.parametrize(
    "data, expected",
    [
        # text, whatever whitespace or UTF-8 it holds
        (b"hello world\n", TEXT),
        (b"  \n\t\r\x0chello", TEXT),
        ("héllo wörld ✓ — ünïcode\n".encode(), TEXT),
        (b"\x1b[31mred\x1b[0m\n", TEXT),  # terminal colours are not binary
        (b"a,b,c\n1,2,3\n", TEXT),
        (b'{"json": true}\n', TEXT),
        # HTML only when the bytes start like HTML
        (b"<!DOCTYPE html><html></html>", HTML),
        (b"<!doctype html>", HTML),
        (b"<html>", HTML),
        (b"<HTML><BODY>", HTML),
        (b"  <p>x", HTML),
        (b"\n\n<p>x", HTML),
        (b"<b>bold</b>", HTML),
        (b'<a href="/x">x</a>', HTML),
        (b"<!-- c -->", HTML),
        (b"<script>alert(1)</script>", HTML),
        (b"<h1>Title</h1>", HTML),
        (b"<iframe src=x>", HTML),
        (b"hello <script>alert(1)</script>", TEXT),
        (b"echo: <html>", TEXT),
        (b"<bogus>", TEXT),
        (b"<htmlx>", TEXT),
        (b"<html", TEXT),
        (b"<br/>", TEXT),  # the tag must end with a space or '>'
        (b" " * 600 + b"<html>", TEXT),  # only the first 512 bytes count
        # XML
        (b"<?xml version='1.0'?><r/>", "text/xml; charset=utf-8"),
        # binary signatures
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "application/pdf"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "image/png"),
        (b"GIF89a\x01\x00\x01\x00", "image/gif"),
        (b"GIF87a\x01\x00\x01\x00", "image/gif"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "image/jpeg"),
        (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03", "application/x-gzip"),
        (b"PK\x03\x04\x14\x00\x00\x00\x08\x00", "application/zip"),
        # binary bytes anywhere in the first 512
        (b"a\x00b", BINARY),
        (b"\x00\x00\x00\x00", BINARY),
        (b"abc\x01def", BINARY),
        (b"x" * 511 + b"\x00", BINARY),
        (b"x" * 512 + b"\x00", TEXT),
        # nothing at all
        (b"", TEXT),
    ],
)
def test_sniff_content_type(data, expected):
    assert sniff_content_type(data) == expected
