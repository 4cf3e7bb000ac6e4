#!/usr/bin/env python3
"""Writes one JSON schema per kind from an API server's /openapi/v2 document, for kubeconform
(file names match the schema-location template {kind}-{group or version}-{version}.json).

Strict like kubeconform's published schemas: objects with declared properties refuse unknown
ones, so a misspelled field fails validation. Standard library only.
"""
import json
import os
import sys


def refs(node, out):
    if isinstance(node, dict):
        r = node.get("$ref")
        if isinstance(r, str) and r.startswith("#/definitions/"):
            out.add(r[len("#/definitions/"):])
        for v in node.values():
            refs(v, out)
    elif isinstance(node, list):
        for v in node:
            refs(v, out)


def strict(node):
    if isinstance(node, dict):
        if node.get("format") == "int-or-string":
            # OpenAPI v2 says "string"; manifests legitimately use either.
            node.pop("type", None)
            node.pop("format")
            node["oneOf"] = [{"type": "string"}, {"type": "integer"}]
        if (
            node.get("type") == "object"
            and "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for v in node.values():
            strict(v)
    elif isinstance(node, list):
        for v in node:
            strict(v)


def main(src, out_dir):
    doc = json.load(open(src))
    defs = doc["definitions"]
    os.makedirs(out_dir, exist_ok=True)
    written = 0
    for name, schema in defs.items():
        for gvk in schema.get("x-kubernetes-group-version-kind", []):
            group, version, kind = gvk.get("group", ""), gvk["version"], gvk["kind"]
            needed, todo = set(), [name]
            while todo:
                n = todo.pop()
                if n in needed or n not in defs:
                    continue
                needed.add(n)
                found = set()
                refs(defs[n], found)
                todo.extend(found - needed)
            body = json.loads(json.dumps(schema))
            body["definitions"] = {n: json.loads(json.dumps(defs[n])) for n in needed}
            strict(body)
            path = os.path.join(out_dir, f"{kind.lower()}-{group or version}-{version}.json")
            json.dump(body, open(path, "w"))
            written += 1
    print(f"wrote {written} schemas to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
