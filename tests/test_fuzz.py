"""Fuzz the server with schemathesis over its own OpenAPI spec, in process (ASGI).

Every generated request (seeded: the same ones each run) must get a non-5xx
answer with no traceback and no file-system path in it. The lite renderer,
short limits and a bounded number of examples per operation keep the run to
a minute or two on two CPU cores.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_server import lite_settings

from musetalk_warm.server import create_app

pytestmark = pytest.mark.slow

EXAMPLES = 30
# WHEP offers (application/sdp): SDP-looking text and arbitrary bytes.
schemathesis.openapi.media_type(
    "application/sdp",
    st.sampled_from([b"", b"v=0\r\n", b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"]) | st.binary(max_size=256),
)
# Absolute paths of this machine that an answer must never reveal.
_PATHS = re.compile(r"(/tmp/|/work/|/home/|/usr/|/root/|site-packages|\\.py\b)")


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def api_schema(fuzz_root: Path):  # type: ignore[no-untyped-def]
    settings_ = lite_settings(
        fuzz_root, max_audio_seconds=2.0, max_sessions=20, archives_keep=3, max_text_chars=120
    )
    app = create_app(settings_)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # starts the app's lifespan
    deadline = time.monotonic() + 120
    while not app.state.warm.ready:
        assert app.state.warm.load_error is None, app.state.warm.load_error
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.1)
    return schema


_SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


def _check(case, root: Path) -> None:  # type: ignore[no-untyped-def]
    response = case.call()
    where = f"{case.method} {case.formatted_path} -> {response.status_code}"
    assert response.status_code < 500, f"{where}: {response.text[:500]}"
    if "video/" in response.headers.get("content-type", [""])[0]:
        return
    text = response.content.decode("utf-8", "replace")
    assert "Traceback" not in text, where
    assert str(root) not in text and not _PATHS.search(text), f"{where}: {text[:500]}"


def test_no_5xx_traceback_or_path(api_schema, fuzz_root: Path) -> None:  # type: ignore[no-untyped-def]
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:
        given(case=operation.as_strategy())(_SETTINGS(lambda case: _check(case, fuzz_root)))()
