"""Tests for kapow.core.forms: urlencoded and multipart form parsing."""

import hashlib
import io
import os
import tempfile
import tracemalloc

import pytest

from kapow.core.forms import FormError, ParsedForm, UploadedFile, parse_form

BOUNDARY = "----kapowBoundary7MA4YWxkTrZu0gW"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
URLENCODED = "application/x-www-form-urlencoded"

BINARY = b"\x00\x01\r\n\r\n--\r\n-" + BOUNDARY.encode()[:10] + b"\xff\xfe\x00\r\n\x00end"


def part(disposition, content, content_type=None):
    head = b"Content-Disposition: " + disposition
    if content_type is not None:
        head += b"\r\nContent-Type: " + content_type
    return head, content


def multipart_body(*parts, boundary=BOUNDARY):
    delimiter = b"--" + boundary.encode()
    out = b""
    for head, content in parts:
        out += delimiter + b"\r\n" + head + b"\r\n\r\n" + content + b"\r\n"
    return out + delimiter + b"--\r\n"


def parse(content_type, data, **kwargs):
    return parse_form(content_type, io.BytesIO(data), **kwargs)


def fd_count():
    return len(os.listdir("/proc/self/fd"))


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")


# Urlencoded


def test_urlencoded_fields_repeated_blank_and_encoded():
    body = b"a=1&b=two&a=3&empty=&flag&sp=hello+world&pct=%26%3D%2B%C3%A9&n%20ame=v&plus=a%2Bb+c"
    form = parse(URLENCODED, body)
    assert form.fields == {
        "a": ["1", "3"],
        "b": ["two"],
        "empty": [""],
        "flag": [""],
        "sp": ["hello world"],
        "pct": ["&=+é"],
        "n ame": ["v"],
        "plus": ["a+b c"],
    }
    assert form.field("a") == "1"
    assert form.field("empty") == ""
    assert form.field("missing") is None
    assert form.files == {}
    assert form.file("a") is None


def test_urlencoded_keeps_arrival_order():
    form = parse(URLENCODED, b"z=1&y=2&x=3&y=4")
    assert list(form.fields) == ["z", "y", "x"]
    assert form.fields["y"] == ["2", "4"]


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 64])
def test_urlencoded_streams_in_small_chunks(chunk_size):
    body = b"first=%E2%82%AC+sign&second=" + b"x" * 200 + b"&third=%zz"
    form = parse(URLENCODED, body, chunk_size=chunk_size)
    assert form.fields == {
        "first": ["€ sign"],
        "second": ["x" * 200],
        "third": ["%zz"],
    }


@pytest.mark.parametrize(
    "content_type",
    [
        "application/x-www-form-urlencoded; charset=UTF-8",
        b"Application/X-WWW-Form-Urlencoded ; charset=utf-8",
        b"application/x-www-form-urlencoded",
    ],
)
def test_urlencoded_content_type_variants(content_type):
    form = parse(content_type, b"k=v%C3%BC")
    assert form.field("k") == "vü"


def test_urlencoded_invalid_utf8_is_replaced():
    form = parse(URLENCODED, b"k=%FF%FEok")
    assert form.field("k") == "\ufffd\ufffdok"


def test_urlencoded_empty_body():
    assert parse(URLENCODED, b"").fields == {}


# Content types that carry no form


@pytest.mark.parametrize(
    "content_type",
    [None, "", "text/plain", "application/json", "multipart/mixed; boundary=x"],
)
def test_other_content_types_give_an_empty_form(content_type):
    form = parse(content_type, b"a=1&b=2")
    assert form == ParsedForm()
    assert form.field("a") is None
    assert form.file("a") is None


# Multipart


def sample_body():
    return multipart_body(
        part(b'form-data; name="title"', b"Hello\r\nWorld"),
        part(b'form-data; name="doc"; filename="a.txt"', b"text file\n", b"text/plain"),
        part(b'form-data; name="title"', b"second"),
        part(
            b'form-data; name="blob"; filename="b.bin"',
            BINARY,
            b"application/octet-stream",
        ),
        part(b"form-data; name=empty", b""),
    )


def check_sample(form):
    assert form.fields == {"title": ["Hello\r\nWorld", "second"], "empty": [""]}
    assert form.field("title") == "Hello\r\nWorld"
    assert list(form.files) == ["doc", "blob"]
    doc = form.file("doc")
    assert (doc.field, doc.filename, doc.content_type) == ("doc", "a.txt", "text/plain")
    assert doc.read() == b"text file\n"
    assert doc.size == len(b"text file\n")
    blob = form.file("blob")
    assert blob.filename == "b.bin"
    assert blob.content_type == "application/octet-stream"
    assert blob.read() == BINARY
    assert blob.size == len(BINARY)


@pytest.mark.parametrize("chunk_size", [65536, 7])
def test_multipart_fields_and_files(chunk_size):
    form = parse(MULTIPART, sample_body(), chunk_size=chunk_size)
    check_sample(form)
    form.close()


def test_multipart_every_chunk_alignment():
    body = sample_body()
    for chunk_size in range(1, len(BOUNDARY) * 3):
        check_sample(parse(MULTIPART, body, chunk_size=chunk_size))


def test_multipart_file_larger_than_chunks_with_boundary_like_bytes():
    content = (BINARY + b"\r\n--" + BOUNDARY.encode()[:-1] + b"\r") * 50
    body = multipart_body(
        part(b'form-data; name="f"; filename="big"', content),
        part(b'form-data; name="after"', b"ok"),
    )
    for chunk_size in (7, 13, 64):
        for max_memory_file in (0, 100, 1 << 20):
            form = parse(MULTIPART, body, chunk_size=chunk_size, max_memory_file=max_memory_file)
            upload = form.file("f")
            assert upload.read() == content
            assert upload.size == len(content)
            assert upload.in_memory is (max_memory_file >= len(content))
            assert form.field("after") == "ok"
            form.close()


def test_multipart_boundary_quoted_and_content_type_as_bytes():
    body = multipart_body(part(b'form-data; name="x"', b"1"), boundary="a b:c")
    form = parse(b'multipart/form-data; charset=utf-8; boundary="a b:c"', body)
    assert form.field("x") == "1"


def test_multipart_empty_filename_is_a_file():
    body = multipart_body(
        part(b'form-data; name="upload"; filename=""', b"", b"application/octet-stream"),
        part(b'form-data; name="named"; filename=""', b"data"),
    )
    form = parse(MULTIPART, body)
    assert form.fields == {}
    empty = form.file("upload")
    assert (empty.filename, empty.size, empty.read()) == ("", 0, b"")
    named = form.file("named")
    assert (named.filename, named.content_type, named.read()) == ("", None, b"data")


def test_multipart_non_ascii_names_values_and_filenames():
    body = multipart_body(
        part('form-data; name="prénom"'.encode(), "José 日本".encode()),
        part(
            'form-data; name="fichier"; filename="résumé 履歴書.pdf"'.encode(),
            b"%PDF",
        ),
        part(b'form-data; name="bad"', b"\xff ok"),
    )
    form = parse(MULTIPART, body, chunk_size=7)
    assert form.field("prénom") == "José 日本"
    assert form.file("fichier").filename == "résumé 履歴書.pdf"
    assert form.field("bad") == "\ufffd ok"


@pytest.mark.parametrize(
    "sent, kept",
    [
        ("../../etc/passwd", "passwd"),
        ("/abs/path/x.txt", "x.txt"),
        ("C:\\Users\\me\\report.pdf", "report.pdf"),
        ("dir\\sub/mixed.bin", "mixed.bin"),
        ("folder/", "folder"),
        ("plain.txt", "plain.txt"),
        ("/", ""),
    ],
)
def test_multipart_filename_keeps_last_path_component(sent, kept):
    body = multipart_body(part(b'form-data; name="f"; filename="' + sent.encode() + b'"', b"x"))
    assert parse(MULTIPART, body).file("f").filename == kept


def test_multipart_rfc2231_filename():
    star_only = b"form-data; name=\"a\"; filename*=UTF-8''%C3%A9t%C3%A9%2Fx.txt"
    both = b'form-data; name="b"; filename="plain.txt"; filename*=utf-8\'\'%E2%82%AC.txt'
    odd_charset = b'form-data; name="c"; filename="plain.txt"; filename*=koi8-r\'\'%C1'
    body = multipart_body(part(star_only, b"1"), part(both, b"2"), part(odd_charset, b"3"))
    form = parse(MULTIPART, body)
    assert form.fields == {}
    assert form.file("a").filename == "x.txt"
    assert form.file("b").filename == "€.txt"
    assert form.file("c").filename == "plain.txt"


def test_multipart_skips_parts_without_name_or_form_data():
    body = multipart_body(
        part(b'form-data; filename="nameless.txt"', b"lost"),
        part(b'attachment; name="att"', b"lost"),
        part(b'form-data; name=""', b"lost"),
        part(b'form-data; name="kept"', b"yes"),
    )
    form = parse(MULTIPART, body)
    assert form.fields == {"kept": ["yes"]}
    assert form.files == {}


def test_multipart_part_without_content_disposition_is_skipped():
    body = multipart_body(
        (b"Content-Type: text/plain", b"orphan"),
        part(b'form-data; name="kept"', b"yes"),
    )
    assert parse(MULTIPART, body).fields == {"kept": ["yes"]}


def test_multipart_only_closing_boundary_is_an_empty_form():
    form = parse(MULTIPART, b"--" + BOUNDARY.encode() + b"--\r\n")
    assert form == ParsedForm()


def test_multipart_repeated_file_field_keeps_order():
    body = multipart_body(
        part(b'form-data; name="f"; filename="1.txt"', b"one"),
        part(b'form-data; name="f"; filename="2.txt"', b"two"),
    )
    form = parse(MULTIPART, body)
    assert [u.filename for u in form.files["f"]] == ["1.txt", "2.txt"]
    assert form.file("f").read() == b"one"
    assert [u.read() for u in form.files["f"]] == [b"one", b"two"]


# Reading uploaded content


@pytest.mark.parametrize("max_memory_file", [0, 1 << 20])
def test_two_readers_interleaved_do_not_disturb_each_other(max_memory_file):
    content = bytes(range(256)) * 40
    body = multipart_body(part(b'form-data; name="f"; filename="x"', content))
    with parse(MULTIPART, body, max_memory_file=max_memory_file) as form:
        upload = form.file("f")
        assert upload.in_memory is (max_memory_file > 0)
        with upload.open() as first, upload.open() as second:
            got_first, got_second = [], []
            while True:
                a = first.read(1000)
                b = second.read(333)
                got_first.append(a)
                got_second.append(b)
                if not a and not b:
                    break
            assert b"".join(got_first) == content
            assert b"".join(got_second) == content
            assert first.seek(10) == 10
            assert second.read(5) == b""
            assert first.read(3) == content[10:13]
        with upload.open() as third:
            assert third.tell() == 0
            assert third.read() == content


def test_large_upload_goes_to_disk_with_bounded_memory():
    size = 20 * 1024 * 1024
    block = hashlib.sha256(b"kapow").digest() * (1 << 15)
    expected = hashlib.sha256()
    with tempfile.TemporaryFile() as body:
        body.write(b"--" + BOUNDARY.encode() + b"\r\n")
        body.write(b'Content-Disposition: form-data; name="note"\r\n\r\nbig one\r\n')
        body.write(b"--" + BOUNDARY.encode() + b"\r\n")
        body.write(b'Content-Disposition: form-data; name="f"; filename="big.bin"\r\n')
        body.write(b"Content-Type: application/octet-stream\r\n\r\n")
        written = 0
        while written < size:
            chunk = block[: size - written]
            body.write(chunk)
            expected.update(chunk)
            written += len(chunk)
        body.write(b"\r\n--" + BOUNDARY.encode() + b"--\r\n")

        tracemalloc.start()
        try:
            form = parse_form(MULTIPART, body, max_memory_file=64 * 1024)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

    try:
        assert peak < 2 * 1024 * 1024
        assert form.field("note") == "big one"
        upload = form.file("f")
        assert upload.size == size
        assert upload.in_memory is False
        actual = hashlib.sha256()
        with upload.open() as reader:
            assert os.fstat(reader.fileno()).st_size == size
            while chunk := reader.read(1 << 20):
                actual.update(chunk)
        assert actual.hexdigest() == expected.hexdigest()
    finally:
        form.close()


def test_in_memory_upload_has_no_file_descriptor():
    body = multipart_body(part(b'form-data; name="f"; filename="x"', b"small"))
    upload = parse(MULTIPART, body).file("f")
    assert upload.in_memory is True
    with upload.open() as reader, pytest.raises(io.UnsupportedOperation):
        reader.fileno()


def test_body_given_as_a_real_temporary_file():
    with tempfile.TemporaryFile() as body:
        body.write(sample_body())
        check_sample(parse_form(MULTIPART, body, chunk_size=7))
    with tempfile.TemporaryFile() as body:
        body.write(b"a=1&a=2")
        assert parse_form(URLENCODED, body).fields == {"a": ["1", "2"]}


@pytest.mark.parametrize(
    "content_type, data",
    [(MULTIPART, sample_body()), (URLENCODED, b"a=1&b=2")],
)
def test_body_is_read_from_the_start_whatever_its_position(content_type, data):
    body = io.BytesIO(data)
    assert body.read() == data
    form = parse_form(content_type, body)
    assert form.fields
    body.seek(5)
    assert parse_form(content_type, body) == form


def test_uploaded_file_equality_ignores_storage():
    body = sample_body()
    first = parse(MULTIPART, body).file("blob")
    second = parse(MULTIPART, body, max_memory_file=0).file("blob")
    assert first == second
    assert first == UploadedFile(
        field="blob",
        filename="b.bin",
        content_type="application/octet-stream",
        size=len(BINARY),
        _spool=None,
    )


# Releasing files


@needs_proc
def test_close_releases_files_and_is_idempotent():
    before = fd_count()
    body = sample_body()
    form = parse(MULTIPART, body, max_memory_file=0)
    assert fd_count() == before + 2
    reader = form.file("blob").open()
    form.close()
    assert fd_count() == before + 1
    assert reader.read() == BINARY
    reader.close()
    assert fd_count() == before
    form.close()
    for name in ("doc", "blob"):
        with pytest.raises(ValueError):
            form.file(name).open()


def test_close_releases_in_memory_files():
    form = parse(MULTIPART, sample_body())
    form.close()
    with pytest.raises(ValueError):
        form.file("doc").open()


def test_form_as_context_manager_closes():
    with parse(MULTIPART, sample_body()) as form:
        assert form.file("doc").read() == b"text file\n"
    with pytest.raises(ValueError):
        form.file("doc").read()


# Malformed multipart


@pytest.mark.parametrize(
    "content_type",
    [
        "multipart/form-data",
        "multipart/form-data; charset=utf-8",
        'multipart/form-data; boundary=""',
        "multipart/form-data; boundary=" + "x" * 300,
    ],
)
def test_multipart_without_usable_boundary(content_type):
    with pytest.raises(FormError) as info:
        parse(content_type, sample_body())
    assert "\n" not in str(info.value)


def test_truncated_multipart_at_every_length():
    body = sample_body()
    for cut in range(len(body) - len(b"--\r\n")):
        with pytest.raises(FormError) as info:
            parse(MULTIPART, body[:cut], chunk_size=7)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "data",
    [
        b"not multipart at all",
        b"--wrongboundary\r\nContent-Disposition: form-data; name=a\r\n\r\nx\r\n",
        b"--" + BOUNDARY.encode() + b"XX\r\n",
    ],
)
def test_broken_multipart_framing(data):
    with pytest.raises(FormError):
        parse(MULTIPART, data)


def test_form_error_is_a_value_error_with_one_line():
    error = FormError("first\nsecond\r\n third")
    assert isinstance(error, ValueError)
    assert str(error) == "first second third"


@needs_proc
def test_failed_parse_releases_spooled_files():
    before = fd_count()
    body = multipart_body(
        part(b'form-data; name="f"; filename="1"', b"complete"),
        part(b'form-data; name="g"; filename="2"', b"partial data"),
    )
    with pytest.raises(FormError):
        parse(MULTIPART, body[:-30], max_memory_file=0)
    assert fd_count() == before


def test_invalid_arguments():
    with pytest.raises(ValueError):
        parse(MULTIPART, sample_body(), chunk_size=0)
    with pytest.raises(ValueError):
        parse(MULTIPART, sample_body(), max_memory_file=-1)
