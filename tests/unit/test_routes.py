"""Tests for kapow.core.routes: patterns, route validation and the route table."""

import copy
import dataclasses
import json
import math
import pickle
import re

import pytest

from kapow.core.routes import (
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_MESSAGE,
    DEFAULT_PING,
    MESSAGE_KINDS,
    METHOD_NOT_ALLOWED,
    MODES,
    OPTIONS,
    STREAMING_REFUSES,
    InvalidRoute,
    Match,
    Route,
    RouteTable,
    compile_pattern,
    quoted,
    route_from_json,
)


def make(route_id, url_pattern="/", method="GET", **kwargs):
    return Route(id=route_id, method=method, url_pattern=url_pattern, **kwargs)


# Patterns


@pytest.mark.parametrize(
    "pattern, path, expected",
    [
        ("/", "/", {}),
        ("/hello", "/hello", {}),
        ("/greet/{name}", "/greet/world", {"name": "world"}),
        ("/a/{x}/b/{y}", "/a/1/b/2", {"x": "1", "y": "2"}),
        ("/files/{path:.*}", "/files/a/b/c", {"path": "a/b/c"}),
        ("/files/{path:.*}", "/files/", {"path": ""}),
        ("/files/{path:.+}/raw", "/files/x/y/raw", {"path": "x/y"}),
        ("/id/{id:[0-9]{3}}", "/id/123", {"id": "123"}),
        ("/id/{id:[0-9]{1,2}}x", "/id/12x", {"id": "12"}),
        ("/f/{file-name}", "/f/report.pdf", {"file-name": "report.pdf"}),
        ("/f/{file name}", "/f/x", {"file name": "x"}),
        ("/v/{1st}", "/v/a", {"1st": "a"}),
        ("/g/{greeting}", "/g/hello world", {"greeting": "hello world"}),
        ("/g/{greeting}", "/g/ñandú ☃", {"greeting": "ñandú ☃"}),
        ("/ñ/{x}", "/ñ/€", {"x": "€"}),
        ("/{a}.{b}", "/file.txt", {"a": "file", "b": "txt"}),
        ("/x/{ab:a|b}", "/x/b", {"ab": "b"}),
        ("/x/{ab:a|b}/y", "/x/a/y", {"ab": "a"}),
        # groups inside a placeholder's regex do not shift the captures
        ("/c/{a:(x)(y)?}/{b:(z)}", "/c/x/z", {"a": "x", "b": "z"}),
        ("/c/{a:(?P<inner>q+)}/{b}", "/c/qq/w", {"a": "qq", "b": "w"}),
        ("/c/{a:(?:p)}-{b:(\\d)(\\d)}", "/c/p-42", {"a": "p", "b": "42"}),
        # regex metacharacters outside placeholders are literal
        ("/a.b/{x}", "/a.b/1", {"x": "1"}),
        ("/a+b(c)?[d]$^|*\\", "/a+b(c)?[d]$^|*\\", {}),
    ],
)
def test_pattern_matches(pattern, path, expected):
    assert compile_pattern(pattern).match(path) == expected


@pytest.mark.parametrize(
    "pattern, path",
    [
        ("/hello", "/hello/"),
        ("/hello/", "/hello"),
        ("/hello", "/hell"),
        ("/hello", "/hellooo"),
        ("/hello", "/x/hello"),
        ("/hello", "/HELLO"),
        ("/greet/{name}", "/greet/"),
        ("/greet/{name}", "/greet/a/b"),
        ("/greet/{name}", "/greet/a/"),
        ("/files/{path:.*}", "/files"),
        ("/files/{path:.*}", "/other/files/a"),
        ("/id/{id:[0-9]{3}}", "/id/12"),
        ("/id/{id:[0-9]{3}}", "/id/1234"),
        ("/id/{id:[0-9]{3}}", "/id/abc"),
        ("/a.b", "/aXb"),
        ("/x/{ab:a|b}", "/x/c"),
        ("/x/{ab:a|b}", "/x/ab"),
        ("/x/{ab:a|b}/y", "/x/b"),
        # like Go's regexp, "." does not match a newline
        ("/files/{p:.*}", "/files/a\nb"),
    ],
)
def test_pattern_does_not_match(pattern, path):
    assert compile_pattern(pattern).match(path) is None


def test_pattern_names_in_order():
    assert compile_pattern("/{b}/{a:.*}/{c}").names == ("b", "a", "c")
    assert compile_pattern("/plain").names == ()


def test_pattern_match_returns_fresh_dict():
    pattern = compile_pattern("/{x}")
    first = pattern.match("/1")
    first["x"] = "changed"
    assert pattern.match("/1") == {"x": "1"}


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        "hello",
        "{x}/hello",
        " /hello",
        "/{x",
        "/x}",
        "/{x}}",
        "/{{x}",
        "/}{x}",
        "/}{",
        "/{x}}{",
        "/{id:[0-9]{3}",
        "/{x:(}",
        "/{x:[}",
        "/{x:a\\}",
        "/{x:*}",
        "/{x:a)(b}",
        "/{}",
        "/{:abc}",
        "/{x:}",
        "/{x}/{x}",
        "/{x}/{x:.*}",
        "/{a:(?P<_kapow_1>z)}/{b}",
        "/{a:(?i)x}",
        "/{a:(x)\\1}",
    ],
)
def test_pattern_refused(pattern):
    with pytest.raises(InvalidRoute):
        compile_pattern(pattern)


@pytest.mark.parametrize("value", [None, 1, b"/x", ["/x"]])
def test_pattern_must_be_string(value):
    with pytest.raises(InvalidRoute):
        compile_pattern(value)


def test_invalid_route_is_a_value_error_with_a_reason():
    with pytest.raises(ValueError, match="unbalanced"):
        compile_pattern("/{x")


@pytest.mark.parametrize(
    "pattern, reason",
    [
        ("/bad/{", "unbalanced braces in url_pattern '/bad/{'"),
        ("/bad}", "unbalanced braces in url_pattern '/bad}'"),
        ("nope", "url_pattern 'nope' does not start with '/'"),
        ("", "url_pattern is empty"),
        (3, "url_pattern must be a string, not 3"),
        ("/x/{a}/{a}", "placeholder name 'a' appears twice in url_pattern '/x/{a}/{a}'"),
        ("/x/{id:[0-9}", "regex '[0-9' of placeholder 'id' does not compile: unterminated character set at position 0"),
        ("/{x:*}", "regex '*' of placeholder 'x' does not compile: nothing to repeat at position 0"),
        ("/{}", "placeholder '{}' has no name"),
        ("/{x:}", "placeholder '{x:}' has an empty regex"),
        ("/{a:(?i)x}", "the placeholder regexes of url_pattern '/{a:(?i)x}' do not compile together: "
                       "global flags not at the start of the expression"),
        ("/" + "a" * 100 + "{", "unbalanced braces in url_pattern '/" + "a" * 79 + "'..."),
    ],
)  # fmt: skip
def test_a_refused_pattern_says_which_part_and_why(pattern, reason):
    with pytest.raises(InvalidRoute) as caught:
        compile_pattern(pattern)
    assert str(caught.value) == reason


# Route


def test_route_defaults():
    route = Route(id="r1", method="GET", url_pattern="/x")
    assert route.entrypoint == "/bin/sh -c"
    assert route.command == ""
    assert route.timeout is None
    assert route.max_concurrency is None
    assert route.pattern.match("/x") == {}


@pytest.mark.parametrize(
    "entrypoint, command, argv",
    [
        ("/bin/sh -c", "echo hi", ["/bin/sh", "-c", "echo hi"]),
        ("/bin/sh -c", "", ["/bin/sh", "-c"]),
        ("/usr/bin/env 'a b'", "", ["/usr/bin/env", "a b"]),
        ("/usr/bin/env 'a b'", "x  y", ["/usr/bin/env", "a b", "x  y"]),
        ('python3 -c "print(1)"', "", ["python3", "-c", "print(1)"]),
        ("  /bin/cat  ", "", ["/bin/cat"]),
        ("", "", []),
        ("", "ls", ["ls"]),
    ],
)
def test_argv(entrypoint, command, argv):
    route = make("r", entrypoint=entrypoint, command=command)
    assert route.argv() == argv


def test_argv_is_a_fresh_list():
    route = make("r", command="x")
    route.argv().append("more")
    assert route.argv() == ["/bin/sh", "-c", "x"]


def test_route_is_immutable():
    route = make("r")
    with pytest.raises(AttributeError):
        route.command = "rm -rf /"


def test_route_method_upper_cased():
    assert make("r", method="get").method == "GET"
    assert make("r", method="Patch").method == "PATCH"


def test_route_equality_ignores_compiled_pattern():
    assert make("r", "/{x}") == make("r", "/{x}")
    assert make("r", "/{x}") != make("r", "/{y}")
    assert hash(make("r", "/{x}")) == hash(make("r", "/{x}"))
    assert "<Pattern" not in repr(make("r"))


def test_to_json_without_optional_limits():
    route = make("r", "/p/{x}", method="post", entrypoint="/bin/bash -c", command="c")
    assert route.to_json(3) == {
        "id": "r",
        "method": "POST",
        "url_pattern": "/p/{x}",
        "entrypoint": "/bin/bash -c",
        "command": "c",
        "index": 3,
    }


def test_to_json_with_optional_limits():
    route = make("r", timeout=2.5, max_concurrency=4)
    data = route.to_json(0)
    assert data["timeout"] == 2.5
    assert data["max_concurrency"] == 4
    assert json.loads(json.dumps(data)) == data


def test_to_json_round_trip():
    original = make(
        "r",
        "/a/{b:.*}",
        method="PUT",
        entrypoint="/usr/bin/env 'a b'",
        command="echo 'x'\n",
        timeout=10,
        max_concurrency=1,
    )
    data = json.loads(json.dumps(original.to_json(7)))
    assert route_from_json(data, data["id"]) == original
    minimal = make("m")
    data = json.loads(json.dumps(minimal.to_json(0)))
    assert route_from_json(data, "m") == minimal


# route_from_json


def test_from_json_minimal():
    route = route_from_json({"method": "GET", "url_pattern": "/"}, "id-1")
    assert route == Route(id="id-1", method="GET", url_pattern="/")
    assert route.entrypoint == "/bin/sh -c"
    assert route.command == ""


def test_from_json_all_fields():
    route = route_from_json(
        {
            "method": "delete",
            "url_pattern": "/x/{y}",
            "entrypoint": "/bin/bash -c",
            "command": "echo",
            "timeout": 1.5,
            "max_concurrency": 3,
        },
        "id-2",
    )
    assert route == Route(
        id="id-2",
        method="DELETE",
        url_pattern="/x/{y}",
        entrypoint="/bin/bash -c",
        command="echo",
        timeout=1.5,
        max_concurrency=3,
    )


def test_from_json_ignores_unknown_keys_and_given_id_and_index():
    route = route_from_json(
        {"method": "GET", "url_pattern": "/", "id": "forged", "index": 5, "x": [1]},
        "real",
    )
    assert route.id == "real"
    assert route == make("real")


def test_from_json_nulls_mean_defaults():
    route = route_from_json(
        {
            "method": "GET",
            "url_pattern": "/",
            "entrypoint": None,
            "command": None,
            "timeout": None,
            "max_concurrency": None,
        },
        "r",
    )
    assert route == make("r")


def test_handler_options_round_trip():
    data = {"method": "POST", "url_pattern": "/", "stdin": "body", "buffer": True, "error_status": 502}
    route = route_from_json(data, "r")
    assert (route.stdin, route.buffer, route.error_status) == ("body", True, 502)
    shown = route.to_json(0)
    assert {key: shown[key] for key in ("stdin", "buffer", "error_status")} == {
        "stdin": "body",
        "buffer": True,
        "error_status": 502,
    }
    assert route_from_json(shown, "r") == route


def test_handler_options_absent_unless_set():
    shown = route_from_json({"method": "GET", "url_pattern": "/", "buffer": None}, "r").to_json(0)
    assert not {"stdin", "buffer", "error_status"} & set(shown)
    assert (
        route_from_json({"method": "GET", "url_pattern": "/", "buffer": False}, "r").to_json(0)["buffer"]
        is False
    )


@pytest.mark.parametrize("code", [400, 500, 599])
def test_error_status_bounds(code):
    assert (
        route_from_json({"method": "GET", "url_pattern": "/", "error_status": code}, "r").error_status == code
    )


def test_from_json_keeps_empty_entrypoint():
    route = route_from_json({"method": "GET", "url_pattern": "/", "entrypoint": ""}, "r")
    assert route.entrypoint == ""


@pytest.mark.parametrize("timeout", [1, 0.001, 30.0, 86400])
def test_from_json_accepts_timeout(timeout):
    data = {"method": "GET", "url_pattern": "/", "timeout": timeout}
    assert route_from_json(data, "r").timeout == timeout


@pytest.mark.parametrize("method", ["GET", "M-SEARCH", "FOO_BAR", "X.Y", "a!#$%&'*+^`|~9"])
def test_from_json_accepts_token_methods(method):
    data = {"method": method, "url_pattern": "/"}
    assert route_from_json(data, "r").method == method.upper()


GOOD = {"method": "GET", "url_pattern": "/"}


@pytest.mark.parametrize(
    "changes",
    [
        # method
        {"method": None},
        {"method": ""},
        {"method": 1},
        {"method": True},
        {"method": ["GET"]},
        {"method": {"GET": 1}},
        {"method": "GE T"},
        {"method": " GET"},
        {"method": "GET\n"},
        {"method": "GET/1"},
        {"method": "G(E)T"},
        {"method": "GÉT"},
        # url_pattern
        {"url_pattern": None},
        {"url_pattern": ""},
        {"url_pattern": 1},
        {"url_pattern": True},
        {"url_pattern": ["/"]},
        {"url_pattern": "x"},
        {"url_pattern": "/{x"},
        {"url_pattern": "/x}"},
        {"url_pattern": "/{x:(}"},
        {"url_pattern": "/{x}/{x}"},
        {"url_pattern": "/{}"},
        {"url_pattern": "/{:abc}"},
        # entrypoint
        {"entrypoint": 1},
        {"entrypoint": True},
        {"entrypoint": ["/bin/sh", "-c"]},
        {"entrypoint": {}},
        {"entrypoint": "unterminated '"},
        {"entrypoint": 'also "unterminated'},
        {"entrypoint": "/bin/sh\0 -c"},
        # command
        {"command": 1},
        {"command": False},
        {"command": ["echo"]},
        {"command": {"a": 1}},
        {"command": "echo \0"},
        # timeout
        {"timeout": True},
        {"timeout": False},
        {"timeout": 0},
        {"timeout": 0.0},
        {"timeout": -1},
        {"timeout": -0.5},
        {"timeout": "10"},
        {"timeout": [10]},
        {"timeout": math.inf},
        {"timeout": math.nan},
        {"timeout": 10**400},
        # max_concurrency
        {"max_concurrency": True},
        {"max_concurrency": 0},
        {"max_concurrency": -1},
        {"max_concurrency": 1.5},
        {"max_concurrency": 2.0},
        {"max_concurrency": "2"},
        {"max_concurrency": [2]},
        # stdin
        {"stdin": "null"},
        {"stdin": "Body"},
        {"stdin": ""},
        {"stdin": True},
        {"stdin": ["body"]},
        # buffer
        {"buffer": 1},
        {"buffer": "true"},
        {"buffer": [True]},
        # error_status
        {"error_status": 399},
        {"error_status": 600},
        {"error_status": 200},
        {"error_status": True},
        {"error_status": 500.0},
        {"error_status": "500"},
        {"error_status": [500]},
    ],
)
def test_from_json_refused(changes):
    data = {**GOOD, **changes}
    with pytest.raises(InvalidRoute):
        route_from_json(data, "r")


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"method": "GE T"}, "method 'GE T' is not an HTTP token (no spaces or separators)"),
        ({"method": ""}, "method is empty"),
        ({"method": ["GET"]}, "method must be a string, not a list"),
        ({"method": True}, "method must be a string, not true"),
        ({"url_pattern": {"a": 1}}, "url_pattern must be a string, not an object"),
        ({"command": 3.5}, "command must be a string, not 3.5"),
        ({"entrypoint": "a\0b"}, "entrypoint contains a NUL character"),
        ({"timeout": "10"}, "timeout must be a number of seconds, not '10'"),
        ({"timeout": 0}, "timeout must be a finite number of seconds > 0, not 0"),
        ({"max_concurrency": 2.0}, "max_concurrency must be an integer >= 1, not 2.0"),
        ({"error_status": "500"}, "error_status must be an integer from 400 to 599, not '500'"),
        ({"stdin": "x" * 100}, f"stdin must be \"body\", not '{'x' * 80}'..."),
    ],
)  # fmt: skip
def test_a_refused_field_is_named_with_its_value(changes, reason):
    with pytest.raises(InvalidRoute) as caught:
        route_from_json({**GOOD, **changes}, "r")
    assert str(caught.value) == reason


@pytest.mark.parametrize(
    "value, shown",
    [
        ("/bad/{", "'/bad/{'"),
        ("it's", '"it\'s"'),
        ("a\nb", "'a\\nb'"),
        ("x" * 81, "'" + "x" * 80 + "'..."),
        (12, "12"),
        (1.5, "1.5"),
        (10**100, "1" + "0" * 79 + "..."),
        (True, "true"),
        (False, "false"),
        (None, "null"),
        ([1], "a list"),
        ({"a": 1}, "an object"),
        (b"x", "bytes"),
    ],
)
def test_quoted_values_are_one_line_and_bounded(value, shown):
    assert quoted(value) == shown


@pytest.mark.parametrize("missing", ["method", "url_pattern"])
def test_from_json_missing_required(missing):
    data = dict(GOOD)
    del data[missing]
    with pytest.raises(InvalidRoute, match=missing):
        route_from_json(data, "r")


@pytest.mark.parametrize("data", [None, [], [GOOD], "route", 1, True])
def test_from_json_not_an_object(data):
    with pytest.raises(InvalidRoute):
        route_from_json(data, "r")


def test_from_json_good_baseline_is_accepted():
    # the refusal cases above differ from this by one field only
    assert route_from_json(dict(GOOD), "r") == make("r")


def test_direct_construction_is_validated_too():
    with pytest.raises(InvalidRoute):
        Route(id="r", method="GET", url_pattern="nope")
    with pytest.raises(InvalidRoute):
        Route(id="r", method="GET", url_pattern="/", max_concurrency=0)
    with pytest.raises(InvalidRoute):
        Route(id=1, method="GET", url_pattern="/")


# RouteTable


def ids(table):
    return [route.id for route in table]


def test_empty_table():
    table = RouteTable()
    assert len(table) == 0
    assert table.snapshot() == ()
    assert table.listing() == []
    assert list(table) == []
    assert table.match("GET", "/") is None


def test_table_from_initial_routes():
    table = RouteTable([make("a"), make("b")])
    assert ids(table) == ["a", "b"]
    with pytest.raises(InvalidRoute):
        RouteTable([make("a"), make("a", "/other")])


def test_append_returns_index():
    table = RouteTable()
    assert table.append(make("a")) == 0
    assert table.append(make("b")) == 1
    assert table.append(make("c")) == 2
    assert ids(table) == ["a", "b", "c"]
    assert len(table) == 3


def test_insert_positions():
    table = RouteTable([make("a"), make("b")])
    assert table.insert(make("first"), 0) == 0
    assert ids(table) == ["first", "a", "b"]
    assert table.insert(make("mid"), 2) == 2
    assert ids(table) == ["first", "a", "mid", "b"]
    assert table.insert(make("end"), 4) == 4
    assert ids(table) == ["first", "a", "mid", "b", "end"]


@pytest.mark.parametrize("index", [2, 3, 100, 10**30])
def test_insert_past_end_appends(index):
    table = RouteTable([make("a"), make("b")])
    assert table.insert(make("new"), index) == 2
    assert ids(table) == ["a", "b", "new"]


def test_insert_into_empty_table():
    table = RouteTable()
    assert table.insert(make("a"), 5) == 0
    assert ids(table) == ["a"]


@pytest.mark.parametrize("index", [-1, -100, 1.0, 0.5, "0", None, True, False])
def test_insert_bad_index_refused(index):
    table = RouteTable([make("a")])
    with pytest.raises(InvalidRoute):
        table.insert(make("new"), index)
    assert ids(table) == ["a"]


def test_duplicate_id_refused():
    table = RouteTable()
    route = make("a")
    table.append(route)
    with pytest.raises(InvalidRoute):
        table.append(route)
    with pytest.raises(InvalidRoute):
        table.insert(make("a", "/different"), 0)
    assert table.snapshot() == (route,)


def test_only_routes_accepted():
    with pytest.raises(TypeError):
        RouteTable().append({"id": "a", "method": "GET", "url_pattern": "/"})


def test_get():
    a, b = make("a"), make("b")
    table = RouteTable([a, b])
    assert table.get("a") == (0, a)
    assert table.get("b") == (1, b)
    assert table.get("b")[1] is b


def test_get_unknown_raises_key_error():
    table = RouteTable([make("a")])
    with pytest.raises(KeyError):
        table.get("nope")
    with pytest.raises(KeyError):
        RouteTable().get("a")


def test_remove():
    a, b, c = make("a"), make("b"), make("c")
    table = RouteTable([a, b, c])
    assert table.remove("b") is b
    assert ids(table) == ["a", "c"]
    assert table.get("c") == (1, c)
    with pytest.raises(KeyError):
        table.get("b")


def test_remove_unknown_raises_key_error():
    table = RouteTable([make("a")])
    with pytest.raises(KeyError):
        table.remove("nope")
    assert ids(table) == ["a"]
    table.remove("a")
    with pytest.raises(KeyError):
        table.remove("a")


def test_removed_id_can_be_added_again():
    table = RouteTable([make("a")])
    table.remove("a")
    assert table.append(make("a", "/again")) == 0


def test_listing_indexes_stay_dense():
    table = RouteTable()
    for name in "abcd":
        table.append(make(name, f"/{name}"))
    table.remove("b")
    table.insert(make("x", "/x"), 0)
    table.remove("d")
    table.insert(make("y", "/y"), 99)
    listing = table.listing()
    assert [entry["index"] for entry in listing] == [0, 1, 2, 3]
    assert [entry["id"] for entry in listing] == ["x", "a", "c", "y"]
    assert listing[2] == make("c", "/c").to_json(2)
    for entry in listing:
        assert table.get(entry["id"])[0] == entry["index"]


def test_snapshot_unaffected_by_later_changes():
    a, b = make("a", "/a"), make("b", "/b")
    table = RouteTable([a, b])
    before = table.snapshot()
    iterator = iter(table)
    table.remove("a")
    table.insert(make("c", "/c"), 0)
    table.append(make("d", "/d"))
    assert before == (a, b)
    assert list(iterator) == [a, b]
    assert ids(table) == ["c", "b", "d"]


def test_matched_route_survives_removal():
    table = RouteTable([make("a", "/{x}", command="echo old")])
    found = table.match("GET", "/1")
    table.remove("a")
    table.append(make("a2", "/{x}", command="echo new"))
    assert found.route.command == "echo old"
    assert found.route.argv() == ["/bin/sh", "-c", "echo old"]
    assert table.match("GET", "/1").route.command == "echo new"


def test_match_result():
    route = make("a", "/greet/{name}")
    table = RouteTable([route])
    found = table.match("GET", "/greet/world")
    assert isinstance(found, Match)
    assert found.route is route
    assert found.matches == {"name": "world"}


def test_match_not_found():
    table = RouteTable([make("a", "/greet/{name}")])
    assert table.match("GET", "/greet") is None
    assert table.match("GET", "/greet/a/b") is None
    assert table.match("POST", "/nothing") is None


def test_match_method_not_allowed():
    table = RouteTable([make("a", "/x"), make("b", "/x", method="PUT")])
    assert table.match("POST", "/x") is METHOD_NOT_ALLOWED
    assert table.match("DELETE", "/x") is METHOD_NOT_ALLOWED
    assert table.match("POST", "/y") is None
    assert table.match("PUT", "/x").route.id == "b"


def test_method_comparison_is_exact():
    table = RouteTable([make("a", "/x", method="get")])
    assert table.match("GET", "/x").route.id == "a"
    assert table.match("get", "/x") is METHOD_NOT_ALLOWED
    assert table.match("HEAD", "/x") is METHOD_NOT_ALLOWED


def test_first_match_wins():
    table = RouteTable(
        [
            make("specific", "/items/{id:[0-9]+}"),
            make("generic", "/items/{name}"),
            make("everything", "/{path:.*}"),
        ]
    )
    assert table.match("GET", "/items/42").route.id == "specific"
    assert table.match("GET", "/items/abc").route.id == "generic"
    assert table.match("GET", "/items/abc").matches == {"name": "abc"}
    assert table.match("GET", "/other/x").route.id == "everything"
    assert table.match("GET", "/").matches == {"path": ""}


def test_order_change_changes_winner():
    table = RouteTable([make("generic", "/items/{name}")])
    table.insert(make("specific", "/items/{id:[0-9]+}"), 0)
    assert table.match("GET", "/items/42").route.id == "specific"
    table.remove("specific")
    assert table.match("GET", "/items/42").route.id == "generic"


def test_method_mismatch_earlier_does_not_hide_later_match():
    table = RouteTable([make("post", "/x", method="POST"), make("get", "/{any}")])
    assert table.match("GET", "/x").route.id == "get"
    assert table.match("POST", "/x").route.id == "post"
    assert table.match("POST", "/y") is METHOD_NOT_ALLOWED


def test_match_on_decoded_path_with_spaces_and_unicode():
    table = RouteTable([make("a", "/café/{what}/{rest:.*}")])
    found = table.match("GET", "/café/hello world/ü/☃ x")
    assert found.matches == {"what": "hello world", "rest": "ü/☃ x"}
    assert table.match("GET", "/caf%C3%A9/x/y") is None


def test_trailing_slash_both_ways():
    table = RouteTable([make("no-slash", "/a"), make("slash", "/b/")])
    assert table.match("GET", "/a").route.id == "no-slash"
    assert table.match("GET", "/a/") is None
    assert table.match("GET", "/b/").route.id == "slash"
    assert table.match("GET", "/b") is None


def test_method_not_allowed_is_a_singleton():
    assert copy.copy(METHOD_NOT_ALLOWED) is METHOD_NOT_ALLOWED
    assert copy.deepcopy(METHOD_NOT_ALLOWED) is METHOD_NOT_ALLOWED
    assert pickle.loads(pickle.dumps(METHOD_NOT_ALLOWED)) is METHOD_NOT_ALLOWED
    assert METHOD_NOT_ALLOWED is not None
    assert not isinstance(METHOD_NOT_ALLOWED, Match)
    assert "METHOD_NOT_ALLOWED" in repr(METHOD_NOT_ALLOWED)


# Modes: websocket and events routes (SPEC section 11)

MODE_FIELDS = ("mode", "origins", "messages", "max_message", "ping", "heartbeat")


def test_mode_constants():
    assert (DEFAULT_MAX_MESSAGE, DEFAULT_PING, DEFAULT_HEARTBEAT) == (1 << 20, 30.0, 15.0)
    assert MODES == ("http", "websocket", "events")
    assert MESSAGE_KINDS == ("lines", "binary")
    assert STREAMING_REFUSES == ("stdin", "buffer", "error_status", "job")
    assert set(MODE_FIELDS) <= set(OPTIONS)


def test_mode_helpers_defaults():
    route = make("r")
    assert (route.mode, route.origins, route.messages, route.max_message, route.ping, route.heartbeat) == (
        (None,) * 6
    )
    assert route.mode_name == "http"
    assert route.messages_kind == "lines"
    assert route.effective_max_message == DEFAULT_MAX_MESSAGE
    assert route.effective_ping == DEFAULT_PING
    assert route.effective_heartbeat == DEFAULT_HEARTBEAT
    assert not route.allows_origin("https://a.example")
    assert not set(MODE_FIELDS) & set(route.to_json(0))


def test_mode_helpers_with_values():
    websocket = make("w", mode="websocket", messages="binary", max_message=2048, ping=0)
    assert (websocket.mode_name, websocket.messages_kind) == ("websocket", "binary")
    assert (websocket.effective_max_message, websocket.effective_ping) == (2048, 0.0)
    assert isinstance(websocket.effective_ping, float)
    assert websocket.effective_heartbeat == DEFAULT_HEARTBEAT
    events = make("e", mode="events", heartbeat=2)
    assert (events.mode_name, events.effective_heartbeat) == ("events", 2.0)
    assert isinstance(events.effective_heartbeat, float)
    assert make("h", mode="http").mode_name == "http"


@pytest.mark.parametrize(
    "fields",
    [
        {"mode": "http"},
        {"mode": "http", "method": "POST", "stdin": "body", "buffer": True, "error_status": 502},
        {"mode": "websocket"},
        {"mode": "websocket", "method": "get"},
        {"mode": "websocket", "origins": ["*"]},
        {"mode": "websocket", "origins": ["https://a.example"]},
        {
            "mode": "websocket",
            "origins": ["https://a.example/", "http://b.example:8080", "ws://c", "wss://[::1]:9"],
        },
        {"mode": "websocket", "origins": ["HTTPS://A.Example", "*"]},
        {"mode": "websocket", "messages": "lines"},
        {"mode": "websocket", "messages": "binary"},
        {"mode": "websocket", "max_message": 1},
        {"mode": "websocket", "max_message": 2**40},
        {"mode": "websocket", "ping": 0},
        {"mode": "websocket", "ping": 0.5},
        {"mode": "websocket", "ping": 30},
        {
            "mode": "websocket",
            "origins": ["https://a.example"],
            "messages": "binary",
            "max_message": 2048,
            "ping": 5,
            "timeout": 60,
            "max_concurrency": 2,
            "queue": 1,
            "keep_running_on_disconnect": False,
        },
        {"mode": "events"},
        {"mode": "events", "heartbeat": 0},
        {"mode": "events", "heartbeat": 0.25},
        {"mode": "events", "heartbeat": 15, "timeout": 3600, "max_concurrency": 10},
    ],
)
def test_modes_accepted(fields):
    data = {**GOOD, **fields}
    route = route_from_json(data, "r")
    shown = route.to_json(0)
    for name in MODE_FIELDS:
        if name in fields:
            assert shown[name] == fields[name]
        else:
            assert name not in shown
    assert json.loads(json.dumps(shown)) == shown
    assert route_from_json(json.loads(json.dumps(shown)), "r") == route


def test_modes_round_trip_shows_the_fields():
    data = {
        "method": "GET",
        "url_pattern": "/ws",
        "command": "cat",
        "mode": "websocket",
        "origins": ["https://a.example", "*"],
        "messages": "binary",
        "max_message": 2048,
        "ping": 5,
    }
    route = route_from_json(data, "w")
    assert route.origins == ("https://a.example", "*")
    shown = json.loads(json.dumps(route.to_json(4)))
    assert shown == {"id": "w", "index": 4, "entrypoint": "/bin/sh -c", **data}
    assert isinstance(route.to_json(4)["origins"], list)
    assert route_from_json(shown, "w") == route
    assert hash(route_from_json(shown, "w")) == hash(route)
    events = route_from_json({"method": "GET", "url_pattern": "/e", "mode": "events", "heartbeat": 2.5}, "e")
    assert {k: events.to_json(0)[k] for k in ("mode", "heartbeat")} == {"mode": "events", "heartbeat": 2.5}
    assert route_from_json(events.to_json(0), "e") == events


def test_empty_origins_count_as_absent():
    route = route_from_json({**GOOD, "mode": "websocket", "origins": []}, "r")
    assert route.origins is None
    assert "origins" not in route.to_json(0)


def test_nulls_mean_defaults_for_mode_fields():
    data = {**GOOD, **dict.fromkeys(MODE_FIELDS)}
    assert route_from_json(data, "r") == make("r")


@pytest.mark.parametrize(
    "origins, origin, allowed",
    [
        (["*"], "https://anything.example", True),
        (["*"], "null", True),
        (["https://a.example"], "https://a.example", True),
        (["https://a.example"], "https://A.EXAMPLE", True),
        (["https://a.example"], "https://a.example:443", True),
        (["https://a.example:443/"], "https://a.example", True),
        (["http://a.example:8080"], "http://a.example:8080", True),
        (["https://a.example"], "http://a.example", False),
        (["https://a.example"], "https://a.example:8443", False),
        (["https://a.example"], "https://b.example", False),
        (["https://a.example"], "https://a.example.evil", False),
        (["https://a.example"], "null", False),
        (["https://a.example"], "", False),
        (["https://a.example"], "https://a.example/path", False),
        (["https://a.example", "https://b.example"], "https://b.example", True),
    ],
)
def test_allows_origin(origins, origin, allowed):
    route = make("r", mode="websocket", origins=origins)
    assert route.allows_origin(origin) is allowed


@pytest.mark.parametrize(
    "changes, reason",
    [
        # mode
        ({"mode": "ws"}, "mode must be"),
        ({"mode": "WebSocket"}, "mode must be"),
        ({"mode": ""}, "mode must be"),
        ({"mode": True}, "mode must be"),
        ({"mode": ["websocket"]}, "mode must be"),
        # a streaming route: GET only, none of stdin, buffer, error_status (job)
        ({"mode": "websocket", "method": "POST"}, "mode websocket needs method GET, not POST"),
        ({"mode": "events", "method": "POST"}, "mode events needs method GET, not POST"),
        ({"mode": "events", "method": "HEAD"}, "needs method GET"),
        ({"mode": "websocket", "stdin": "body"}, "mode websocket takes no stdin"),
        ({"mode": "websocket", "buffer": True}, "mode websocket takes no buffer"),
        ({"mode": "websocket", "buffer": False}, "mode websocket takes no buffer"),
        ({"mode": "websocket", "error_status": 500}, "mode websocket takes no error_status"),
        ({"mode": "events", "stdin": "body"}, "mode events takes no stdin"),
        ({"mode": "events", "buffer": True}, "mode events takes no buffer"),
        ({"mode": "events", "error_status": 502}, "mode events takes no error_status"),
        # websocket only
        ({"origins": ["*"]}, "origins needs mode websocket, not http"),
        ({"mode": "http", "origins": ["https://a.example"]}, "origins needs mode websocket, not http"),
        ({"mode": "events", "origins": ["*"]}, "origins needs mode websocket, not events"),
        ({"messages": "lines"}, "messages needs mode websocket"),
        ({"mode": "events", "messages": "binary"}, "messages needs mode websocket"),
        ({"max_message": 1024}, "max_message needs mode websocket"),
        ({"mode": "events", "max_message": 1024}, "max_message needs mode websocket"),
        ({"ping": 5}, "ping needs mode websocket"),
        ({"mode": "events", "ping": 5}, "ping needs mode websocket"),
        # events only
        ({"heartbeat": 5}, "heartbeat needs mode events, not http"),
        ({"mode": "websocket", "heartbeat": 5}, "heartbeat needs mode events, not websocket"),
        # origins
        ({"mode": "websocket", "origins": "https://a.example"}, "origins must be a list of strings"),
        ({"mode": "websocket", "origins": {"https://a.example": 1}}, "origins must be a list of strings"),
        ({"mode": "websocket", "origins": [1]}, "origins must be a list of strings"),
        ({"mode": "websocket", "origins": [None]}, "origins must be a list of strings"),
        ({"mode": "websocket", "origins": ["*", ["*"]]}, "origins must be a list of strings"),
        ({"mode": "websocket", "origins": True}, "origins must be a list of strings"),
        ({"mode": "websocket", "origins": 1}, "origins must be a list of strings"),
        ({"mode": "websocket", "origins": ["not-a-url"]}, "origin 'not-a-url' is not"),
        ({"mode": "websocket", "origins": [""]}, "is not"),
        ({"mode": "websocket", "origins": ["**"]}, "is not"),
        ({"mode": "websocket", "origins": ["a.example"]}, "is not"),
        ({"mode": "websocket", "origins": ["//a.example"]}, "is not"),
        ({"mode": "websocket", "origins": ["ftp://a.example"]}, "is not"),
        ({"mode": "websocket", "origins": ["file:///etc"]}, "is not"),
        ({"mode": "websocket", "origins": ["https://"]}, "is not"),
        ({"mode": "websocket", "origins": ["https://:443"]}, "is not"),
        ({"mode": "websocket", "origins": ["https://a.example/app"]}, "is not"),
        ({"mode": "websocket", "origins": ["https://a.example//"]}, "is not"),
        ({"mode": "websocket", "origins": ["https://a.example?x=1"]}, "is not"),
        ({"mode": "websocket", "origins": ["https://a.example?"]}, "is not"),
        ({"mode": "websocket", "origins": ["https://a.example#top"]}, "is not"),
        ({"mode": "websocket", "origins": ["https://a.example#"]}, "is not"),
        ({"mode": "websocket", "origins": ["https://user@a.example"]}, "is not"),
        ({"mode": "websocket", "origins": ["https://a.example:99999"]}, "is not"),
        ({"mode": "websocket", "origins": ["https://a.example:port"]}, "is not"),
        ({"mode": "websocket", "origins": ["https://a.exa mple"]}, "is not"),
        ({"mode": "websocket", "origins": ["https://a.exa\tmple"]}, "is not"),
        ({"mode": "websocket", "origins": [" https://a.example"]}, "is not"),
        ({"mode": "websocket", "origins": ["https://a.example\n"]}, "is not"),
        ({"mode": "websocket", "origins": ["https://[::1"]}, "is not"),
        ({"mode": "websocket", "origins": ["*", "nope"]}, "origin 'nope' is not"),
        # messages
        ({"mode": "websocket", "messages": "text"}, 'messages must be "lines" or "binary"'),
        ({"mode": "websocket", "messages": "Binary"}, "messages must be"),
        ({"mode": "websocket", "messages": ""}, "messages must be"),
        ({"mode": "websocket", "messages": True}, "messages must be"),
        ({"mode": "websocket", "messages": ["lines"]}, "messages must be"),
        # max_message
        ({"mode": "websocket", "max_message": 0}, "max_message must be an integer >= 1"),
        ({"mode": "websocket", "max_message": -1}, "max_message must be an integer >= 1"),
        ({"mode": "websocket", "max_message": True}, "max_message must be an integer >= 1"),
        ({"mode": "websocket", "max_message": 1024.0}, "max_message must be an integer >= 1"),
        ({"mode": "websocket", "max_message": 1.5}, "max_message must be an integer >= 1"),
        ({"mode": "websocket", "max_message": "1024"}, "max_message must be an integer >= 1"),
        ({"mode": "websocket", "max_message": [1024]}, "max_message must be an integer >= 1"),
        # ping
        ({"mode": "websocket", "ping": -1}, "ping must be a finite number of seconds >= 0"),
        ({"mode": "websocket", "ping": -0.1}, "ping must be a finite number of seconds >= 0"),
        ({"mode": "websocket", "ping": math.inf}, "ping must be a finite number"),
        ({"mode": "websocket", "ping": math.nan}, "ping must be a finite number"),
        ({"mode": "websocket", "ping": 10**400}, "ping is too large"),
        ({"mode": "websocket", "ping": True}, "ping must be a number"),
        ({"mode": "websocket", "ping": False}, "ping must be a number"),
        ({"mode": "websocket", "ping": "30"}, "ping must be a number"),
        ({"mode": "websocket", "ping": [30]}, "ping must be a number"),
        # heartbeat
        ({"mode": "events", "heartbeat": -1}, "heartbeat must be a finite number of seconds >= 0"),
        ({"mode": "events", "heartbeat": math.inf}, "heartbeat must be a finite number"),
        ({"mode": "events", "heartbeat": math.nan}, "heartbeat must be a finite number"),
        ({"mode": "events", "heartbeat": True}, "heartbeat must be a number"),
        ({"mode": "events", "heartbeat": "15"}, "heartbeat must be a number"),
    ],
)
def test_modes_refused(changes, reason):
    data = {**GOOD, **changes}
    with pytest.raises(InvalidRoute, match=re.escape(reason)) as caught:
        route_from_json(data, "r")
    assert "\n" not in str(caught.value)


def test_timeout_still_refuses_zero():
    # ping and heartbeat take 0; the other numbers of seconds still do not
    for name in ("timeout", "queue_timeout"):
        with pytest.raises(InvalidRoute, match=f"{name} must be a finite number of seconds > 0"):
            route_from_json({**GOOD, name: 0}, "r")


def test_a_streaming_route_refuses_a_job_field_when_routes_have_one():
    @dataclasses.dataclass(frozen=True)
    class WithJob(Route):
        job: bool | None = None

    assert WithJob(id="r", method="GET", url_pattern="/", job=True).job is True
    assert WithJob(id="r", method="GET", url_pattern="/", mode="events").job is None
    for mode in ("websocket", "events"):
        with pytest.raises(InvalidRoute, match=f"mode {mode} takes no job"):
            WithJob(id="r", method="GET", url_pattern="/", mode=mode, job=True)


def test_mode_fields_validated_on_direct_construction():
    with pytest.raises(InvalidRoute):
        Route(id="r", method="GET", url_pattern="/", mode="websocket", origins=("nope",))
    with pytest.raises(InvalidRoute):
        Route(id="r", method="POST", url_pattern="/", mode="events")
    route = Route(id="r", method="GET", url_pattern="/", mode="websocket", origins=["https://a.example"])
    assert route.origins == ("https://a.example",)


# Traffic policy: rate and cors (SPEC section 13; the decisions are tested in test_traffic.py)


def test_traffic_fields_are_options():
    assert "rate" in OPTIONS and "cors" in OPTIONS
    route = make("r")
    assert route.rate is None and route.cors is None and route.cors_policy is None
    assert not {"rate", "cors"} & set(route.to_json(0))


def test_rate_defaults_filled_in_and_shown():
    route = route_from_json({**GOOD, "rate": {"requests": 10, "per": 1}}, "r")
    assert route.rate == {"requests": 10, "per": 1, "burst": 10, "key": "client"}
    shown = route.to_json(0)
    assert shown["rate"] == {"requests": 10, "per": 1, "burst": 10, "key": "client"}
    assert json.loads(json.dumps(shown)) == shown
    assert route_from_json(shown, "r") == route
    given = {"requests": 1, "per": 0.5, "burst": 3, "key": "route"}
    assert route_from_json({**GOOD, "rate": given}, "r").rate == given


def test_cors_defaults_filled_in_and_shown():
    route = route_from_json({**GOOD, "cors": {"origins": ["https://a.example"]}}, "r")
    expected = {"origins": ["https://a.example"], "headers": [], "max_age": 600, "credentials": False}
    assert route.cors == expected
    shown = route.to_json(0)
    assert shown["cors"] == expected
    assert route_from_json(json.loads(json.dumps(shown)), "r") == route
    policy = route.cors_policy
    assert policy is not None and policy.spec == expected
    assert policy.allows("https://a.example") and not policy.allows("https://b.example")
    assert policy.response_headers("https://a.example") == [
        ("Access-Control-Allow-Origin", "https://a.example"),
        ("Vary", "Origin"),
    ]


def test_traffic_fields_given_as_null_are_absent():
    route = route_from_json({**GOOD, "rate": None, "cors": None}, "r")
    assert route == make("r")
    assert route.cors_policy is None


def test_to_json_gives_copies_of_the_traffic_fields():
    route = make(
        "r", rate={"requests": 1, "per": 1}, cors={"origins": ["https://a.example"], "headers": ["X-A"]}
    )
    shown = route.to_json(0)
    shown["rate"]["requests"] = 99
    shown["cors"]["origins"].append("https://evil.example")
    shown["cors"]["headers"].clear()
    again = route.to_json(0)
    assert again["rate"]["requests"] == 1
    assert again["cors"]["origins"] == ["https://a.example"]
    assert again["cors"]["headers"] == ["X-A"]


def test_traffic_fields_with_other_fields():
    both = {**GOOD, "rate": {"requests": 5, "per": 60, "key": "route"}, "cors": {"origins": ["*"]}}
    route = route_from_json({**both, "max_concurrency": 2, "queue": 3}, "r")
    assert route.rate["key"] == "route" and route.cors["origins"] == ["*"]
    assert route == route_from_json(route.to_json(0), "r")
    assert hash(route) == hash(route_from_json(route.to_json(0), "r"))
    # events are read cross-origin with EventSource; any mode takes a rate
    assert route_from_json({**both, "mode": "events"}, "r").cors_policy is not None
    assert route_from_json({**both, "mode": "websocket"}, "r").rate is not None


def test_traffic_fields_differ_in_equality():
    assert make("r", rate={"requests": 1, "per": 1}) != make("r", rate={"requests": 2, "per": 1})
    assert make("r", rate={"requests": 1, "per": 1}) == make("r", rate={"requests": 1, "per": 1, "burst": 1})
    assert make("r", cors={"origins": ["*"]}) != make("r", cors={"origins": ["*"], "max_age": 5})


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        # rate
        ({"rate": {}}, "rate requests is missing"),
        ({"rate": {"per": 1}}, "rate requests is missing"),
        ({"rate": {"requests": 1}}, "rate per is missing"),
        ({"rate": "10/s"}, "rate must be a JSON object"),
        ({"rate": [10, 1]}, "rate must be a JSON object"),
        ({"rate": True}, "rate must be a JSON object"),
        ({"rate": {"requests": 1, "per": 1, "burts": 2}}, "unknown rate keys: burts"),
        ({"rate": {"requests": 0, "per": 1}}, "rate requests must be a whole number from 1 to 1000000"),
        ({"rate": {"requests": -5, "per": 1}}, "rate requests must be a whole number"),
        ({"rate": {"requests": 2.0, "per": 1}}, "rate requests must be a whole number"),
        ({"rate": {"requests": True, "per": 1}}, "rate requests must be a whole number"),
        ({"rate": {"requests": "10", "per": 1}}, "rate requests must be a whole number"),
        ({"rate": {"requests": 10**7, "per": 1}}, "rate requests must be a whole number"),
        ({"rate": {"requests": 1, "per": 0}}, "rate per must be a number of seconds > 0"),
        ({"rate": {"requests": 1, "per": -1.5}}, "rate per must be a number of seconds > 0"),
        ({"rate": {"requests": 1, "per": math.inf}}, "rate per must be a number of seconds > 0"),
        ({"rate": {"requests": 1, "per": math.nan}}, "rate per must be a number of seconds > 0"),
        ({"rate": {"requests": 1, "per": 10**400}}, "rate per must be a number of seconds > 0"),
        ({"rate": {"requests": 1, "per": False}}, "rate per must be a number of seconds"),
        ({"rate": {"requests": 1, "per": "1s"}}, "rate per must be a number of seconds"),
        ({"rate": {"requests": 1, "per": 1, "burst": 0}}, "rate burst must be a whole number from 1 to"),
        ({"rate": {"requests": 1, "per": 1, "burst": 1.5}}, "rate burst must be a whole number"),
        ({"rate": {"requests": 1, "per": 1, "burst": "2"}}, "rate burst must be a whole number"),
        ({"rate": {"requests": 1, "per": 1, "key": "ip"}}, 'rate key must be "client" or "route"'),
        ({"rate": {"requests": 1, "per": 1, "key": 1}}, 'rate key must be "client" or "route"'),
        # cors
        ({"cors": {}}, "cors origins is missing"),
        ({"cors": ["https://a.example"]}, "cors must be a JSON object"),
        ({"cors": "https://a.example"}, "cors must be a JSON object"),
        ({"cors": {"origins": []}}, "cors origins must be a non-empty list of strings"),
        ({"cors": {"origins": "*"}}, "cors origins must be a non-empty list of strings"),
        ({"cors": {"origins": [None]}}, "cors origins must be a non-empty list of strings"),
        ({"cors": {"origins": ["*"], "methods": ["GET"]}}, "unknown cors keys: methods"),
        ({"cors": {"origins": ["not-a-url"]}}, "cors origin 'not-a-url' is not '*' or scheme://host[:port]"),
        ({"cors": {"origins": ["https://a.example/"]}}, "cors origin 'https://a.example/' is not"),
        ({"cors": {"origins": ["https://a.example/app"]}}, "cors origin 'https://a.example/app' is not"),
        ({"cors": {"origins": ["https://a.example?x=1"]}}, "cors origin 'https://a.example?x=1' is not"),
        ({"cors": {"origins": ["https://a.example#top"]}}, "cors origin 'https://a.example#top' is not"),
        ({"cors": {"origins": ["https://me@a.example"]}}, "cors origin 'https://me@a.example' is not"),
        ({"cors": {"origins": ["ws://a.example"]}}, "cors origin 'ws://a.example' is not"),
        ({"cors": {"origins": ["null"]}}, "cors origin 'null' is not"),
        ({"cors": {"origins": ["*", "https://a.example"]}}, "cors origins: '*' must be the only one"),
        (
            {"cors": {"origins": ["*"], "credentials": True}},
            'cors credentials cannot be true with origins ["*"]',
        ),
        ({"cors": {"origins": ["*"], "credentials": "yes"}}, "cors credentials must be true or false"),
        ({"cors": {"origins": ["*"], "headers": "X-A"}}, "cors headers must be a list of header names"),
        ({"cors": {"origins": ["*"], "headers": ["X A"]}}, "cors header 'X A' is not a header name"),
        ({"cors": {"origins": ["*"], "headers": ["X-A\n"]}}, "cors header 'X-A\\n' is not a header name"),
        (
            {"cors": {"origins": ["*"], "max_age": -1}},
            "cors max_age must be a whole number of seconds from 0",
        ),
        ({"cors": {"origins": ["*"], "max_age": 60.0}}, "cors max_age must be a whole number of seconds"),
        ({"cors": {"origins": ["*"], "max_age": True}}, "cors max_age must be a whole number of seconds"),
    ],
)
def test_traffic_fields_refused(changes, reason):
    with pytest.raises(InvalidRoute) as caught:
        route_from_json({**GOOD, **changes}, "r")
    message = str(caught.value)
    assert message.startswith(reason)
    assert "\n" not in message


def test_traffic_fields_validated_on_direct_construction():
    with pytest.raises(InvalidRoute, match="rate burst"):
        Route(id="r", method="GET", url_pattern="/", rate={"requests": 1, "per": 1, "burst": 0})
    with pytest.raises(InvalidRoute, match="cors origins"):
        Route(id="r", method="GET", url_pattern="/", cors={"origins": ()})
    route = Route(id="r", method="GET", url_pattern="/", cors={"origins": ("https://a.example",)})
    assert route.cors == {
        "origins": ["https://a.example"],
        "headers": [],
        "max_age": 600,
        "credentials": False,
    }


def test_origin_key_is_still_offered_here():
    from kapow.core import routes, traffic

    assert routes.origin_key is traffic.origin_key
    assert routes.origin_key("wss://a.example/") == ("wss", "a.example", 443)
