"""Laws of the loader: whatever it is given, it returns fleets or raises SpecError
whose every diagnostic has a real position; nothing else escapes."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetctl.spec import SpecError, load_text

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=12), children, max_size=4),
    ),
    max_leaves=25,
)
# Mappings shaped like specs, so validation (not just parsing) is exercised.
spec_like = st.fixed_dictionaries(
    {
        "apiVersion": st.sampled_from(["fleetctl/v1", "v2", 1]),
        "kind": st.sampled_from(["Fleet", "Other"]),
        "name": st.from_regex(r"[a-zA-Z0-9_-]{0,8}", fullmatch=True),
        "sandboxes": st.lists(
            st.dictionaries(
                st.sampled_from(
                    [
                        "name",
                        "image",
                        "replicas",
                        "expose",
                        "env",
                        "secrets",
                        "jobs",
                        "imgae",
                        "timeout_minutes",
                    ]
                ),
                documents,
                max_size=5,
            ),
            max_size=3,
        ),
    }
)


def assert_only_positioned_spec_errors(data: str | bytes) -> None:
    diagnostics = []
    try:
        load_text(data, file="fuzz.yaml")
    except SpecError as exc:
        diagnostics = exc.diagnostics
    for diagnostic in diagnostics:
        assert diagnostic.file == "fuzz.yaml"
        assert diagnostic.position.line >= 1
        assert diagnostic.position.col >= 1
        assert diagnostic.message


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=400))
def test_any_bytes_give_only_positioned_spec_errors(data: bytes) -> None:
    assert_only_positioned_spec_errors(data)


@FUZZ
@given(st.text(alphabet=st.sampled_from(list("{}[]%#:-'\"!&*|>\n abc123")), max_size=200))
def test_yaml_and_jinja_punctuation_gives_only_positioned_spec_errors(text: str) -> None:
    assert_only_positioned_spec_errors(text)


@FUZZ
@given(documents)
def test_any_yaml_value_gives_only_positioned_spec_errors(value: object) -> None:
    assert_only_positioned_spec_errors(yaml.safe_dump(value))


@FUZZ
@given(spec_like)
def test_spec_shaped_yaml_gives_only_positioned_spec_errors(value: object) -> None:
    assert_only_positioned_spec_errors(yaml.safe_dump(value))
