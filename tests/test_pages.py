import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idefics_cli.documents.pages import PageSpec, parse_page_spec
from idefics_cli.errors import IdeficsError, UsageError


@pytest.mark.parametrize(
    ("spec", "n", "expected"),
    [
        (None, 3, [1, 2, 3]),
        ("all", 2, [1, 2]),
        ("3", 5, [3]),
        ("1-4", 5, [1, 2, 3, 4]),
        ("1,3,7-", 9, [1, 3, 7, 8, 9]),
        ("-2", 5, [4, 5]),
        ("-1", 1, [1]),
        ("5-", 5, [5]),
        (" 2 - 3 , 1 ", 5, [2, 3, 1]),
        ("3,1,3,2-4", 5, [3, 1, 2, 4]),
        ("2-2", 5, [2]),
        (2, 5, [2]),  # the library's pages=2
    ],
)
def test_resolve(spec, n, expected):
    assert parse_page_spec(spec).resolve(n) == expected


BAD = ["0", "a", "3-1", "1,,2", "", "  ", "-0", "0-2", "1-2-3", "--2", "1,", ",1", "1.5", "²", "1 2", "+1",
       0, -2, True, 1.0, [1, 2], b"1"]


@pytest.mark.parametrize("spec", BAD)
def test_bad_specs_are_usage_errors(spec):
    with pytest.raises(UsageError) as exc:
        parse_page_spec(spec)
    assert exc.value.code == "usage"
    assert exc.value.hint


@pytest.mark.parametrize(("spec", "n", "expected"), [
    ("2-3", 1, None),  # an image: none of the pages exists
    ("1-3", 2, [1, 2]),  # a range past the end is clipped
    ("2-9", 5, [2, 3, 4, 5]),
    ("1,6", 5, [1]),  # a single page past the end is left out
    ("6-,2", 5, [2]),
    ("-6", 5, [1, 2, 3, 4, 5]),  # the last six of five pages: all five
    ("7", 5, None),
    ("6-", 5, None),
    ("6-8,9", 5, None),
])
def test_ranges_are_clipped_to_each_document(spec, n, expected):
    """A spec means "these pages, where they exist"; only a document with none of them is an error."""
    if expected is None:
        with pytest.raises(IdeficsError) as exc:
            parse_page_spec(spec).resolve(n)
        assert exc.value.code == "page_out_of_range"
        noun = "page" if n == 1 else "pages"
        assert exc.value.message == f"none of the chosen pages ({spec}) is in the document (it has {n} {noun})"
    else:
        assert parse_page_spec(spec).resolve(n) == expected


def test_str_is_normalized_and_round_trips():
    spec = parse_page_spec(" 1 , 3-3, 7 - ,-2, 4-6 ")
    assert str(spec) == "1,3,7-,-2,4-6"
    assert parse_page_spec(str(spec)) == spec
    assert str(parse_page_spec(None)) == "all"
    assert parse_page_spec(None) == PageSpec() and not PageSpec().ranges


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("0123456789-, a\t"), max_size=12) | st.text(max_size=8), st.integers(1, 30))
def test_random_specs_fail_cleanly_or_resolve_in_range(text, n):
    try:
        spec = parse_page_spec(text)
    except UsageError:
        return
    try:
        pages = spec.resolve(n)
    except IdeficsError as e:
        assert e.code == "page_out_of_range"
        return
    assert pages and all(1 <= p <= n for p in pages)
    assert len(pages) == len(set(pages))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20), st.integers(0, 5)), min_size=1, max_size=4), st.integers(25, 40))
def test_valid_specs_resolve_within_range(items, n):
    text = ",".join(f"{a}-{a + d}" if d else str(a) for a, d in items)
    pages = parse_page_spec(text).resolve(n)
    expected = list(dict.fromkeys(p for a, d in items for p in range(a, a + d + 1)))
    assert pages == expected
