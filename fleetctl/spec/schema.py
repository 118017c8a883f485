"""The JSON Schema of a fleet spec, generated from the models.

Numbers and booleans also accept a Jinja2 expression string (`"{{ shards }}"`),
since specs are validated by editors before rendering.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from fleetctl.spec.models import FleetSpec

TEMPLATE_STRING = {
    "type": "string",
    "pattern": r"\{\{.*\}\}",
    "description": "A Jinja2 expression, rendered before validation.",
}


class _Generator(GenerateJsonSchema):
    def _templatable(self, schema: JsonSchemaValue) -> JsonSchemaValue:
        return {"anyOf": [schema, TEMPLATE_STRING]}

    def int_schema(self, schema: core_schema.IntSchema) -> JsonSchemaValue:
        return self._templatable(super().int_schema(schema))

    def float_schema(self, schema: core_schema.FloatSchema) -> JsonSchemaValue:
        return self._templatable(super().float_schema(schema))

    def bool_schema(self, schema: core_schema.BoolSchema) -> JsonSchemaValue:
        return self._templatable(super().bool_schema(schema))


def fleet_schema() -> dict[str, Any]:
    """The spec's JSON Schema (draft 2020-12) as a dict."""
    schema = FleetSpec.model_json_schema(by_alias=True, schema_generator=_Generator)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def schema_text() -> str:
    """The schema exactly as `schemas/fleet.schema.json` holds it."""
    return json.dumps(fleet_schema(), indent=2, ensure_ascii=False) + "\n"
