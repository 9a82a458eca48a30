"""The generated documents under docs/ are valid by their own standards'
tools (the Rust tests check that they are current and that real traffic
matches them):

- docs/openapi.json with openapi-spec-validator (OpenAPI 3.1);
- docs/schemas/*.json against the JSON Schema 2020-12 metaschema, and the
  the trigger example of docs/contracts.md against the trigger schema;
- docs/asyncapi.yaml with @asyncapi/parser (AsyncAPI 3.0), through node.

Each check is shown to fail on a broken copy, so a validator that accepts
everything would not pass here.
"""

import copy
import json
import os
import pathlib
import shutil
import subprocess

import jsonschema
import pytest
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
NODE_MODULES = os.environ.get("ASYNCAPI_NODE_MODULES", str(ROOT / "target/node/node_modules"))
CHECK = pathlib.Path(__file__).with_name("asyncapi_check.mjs")


def load(rel):
    return json.loads((DOCS / rel).read_text())


def test_openapi_document_is_valid_openapi_3_1():
    doc = load("openapi.json")
    assert doc["openapi"].startswith("3.1")
    validate(doc)
    broken = copy.deepcopy(doc)
    broken["paths"]["/healthz"]["get"]["responses"] = "none"
    with pytest.raises(OpenAPIValidationError):
        validate(broken)


@pytest.mark.parametrize("name", ["trigger", "event", "control"])
def test_json_schemas_are_valid_2020_12(name):
    schema = load(f"schemas/{name}.schema.json")
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    with pytest.raises(jsonschema.SchemaError):
        jsonschema.Draft202012Validator.check_schema({**schema, "type": 5})


def test_the_contracts_trigger_example_is_valid():
    text = (ROOT / "docs" / "contracts.md").read_text()
    section = text.split("## The trigger message", 1)[1]
    example = json.loads(section.split("```json", 1)[1].split("```", 1)[0])
    v = jsonschema.Draft202012Validator(load("schemas/trigger.schema.json"))
    v.validate(example)
    assert not v.is_valid({**example, "submit": {}}), "job_id and submit together"
    assert not v.is_valid({**example, "id": "has space"})
    assert not v.is_valid({**example, "id": "decoy/../other"}), "a .. segment"


def run_asyncapi_check(path):
    node = shutil.which("node")
    assert node, "node is needed (make docs-test installs nodejs where it can)"
    return subprocess.run(
        [node, str(CHECK), str(path)],
        env={**os.environ, "ASYNCAPI_NODE_MODULES": NODE_MODULES},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_asyncapi_document_is_valid_asyncapi_3(tmp_path):
    ok = run_asyncapi_check(DOCS / "asyncapi.yaml")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "valid AsyncAPI 3.0.0" in ok.stdout
    broken = tmp_path / "broken.yaml"
    broken.write_text((DOCS / "asyncapi.yaml").read_text().replace('action: "receive"', 'action: "listen"'))
    bad = run_asyncapi_check(broken)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "action" in bad.stdout
