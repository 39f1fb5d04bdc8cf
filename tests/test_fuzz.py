"""Schema-driven fuzzing of a real `mnist-k8s serve` process with Schemathesis (v4 API).

The schema is the app's own OpenAPI document (the one the server publishes at `/openapi.json`: checked
equal below). For every operation Schemathesis generates valid and invalid requests (a bounded number of
examples per operation) and runs its default checks on every response: no 5xx, the status code and the
content type are documented for that operation, the body conforms to the documented schema, invalid data is
rejected, unsupported methods get 405. Two default checks are left out where they do not apply:
`positive_data_acceptance` everywhere, because a request can fit the schema (a binary file) and still rightly
be refused (a blank or corrupt image: 4xx); and `negative_data_rejection` for `POST /predict/batch`, which
answers per file by design: a part that is not an image gets its own error inside a 200 list.

`tests/test_app.py` fuzzes the app in-process for "no 500, JSON errors"; this adds the real HTTP server and
the response-conformance checks."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import negative_data_rejection, positive_data_acceptance

from helpers import serve_copy
from mnist_k8s.api import create_app
from mnist_k8s.config import Settings

pytestmark = pytest.mark.timeout(600)
EXAMPLES = 100                      # per operation and generation phase; bounded so the run stays short
COUNT: dict[str, int] = {}


@pytest.fixture(scope="module")
def openapi(tmp_path_factory) -> dict:
    "The app's own OpenAPI document, built in-process (the app is created, nothing is started)."
    return create_app(Settings(_env_file=None, model_dir=tmp_path_factory.mktemp("fuzz-schema"))).openapi()


@pytest.fixture(scope="module")
def api_schema(openapi):
    return schemathesis.openapi.from_dict(openapi)


schema = schemathesis.pytest.from_fixture("api_schema")   # loaded when the test runs, not at import


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    with serve_copy(trained, tmp_path_factory.mktemp("fuzz-models")) as s:
        yield s
        print(f"\nschemathesis examples per operation: {COUNT} (total {sum(COUNT.values())})")
        metrics = s.get("/metrics").text
        assert 'status="5' not in metrics and "Traceback" not in s.output(), s.output()[-3000:]


def test_served_schema_is_the_fuzzed_schema(server, openapi):
    assert server.get("/openapi.json").json() == openapi


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_api_conforms_to_its_schema(server, case):
    COUNT[case.operation.label] = COUNT.get(case.operation.label, 0) + 1
    excluded = [positive_data_acceptance] + ([negative_data_rejection] if case.path == "/predict/batch" else [])
    case.call_and_validate(base_url=server.url, excluded_checks=excluded, timeout=30)
