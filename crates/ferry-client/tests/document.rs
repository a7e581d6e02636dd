//! The client against the API document (`openapi.json`, which ferry-api's own test holds equal to
//! what the server serves): the same operations, methods, paths, parameters and schemas.

use ferry_client::OPERATIONS;
use serde_json::Value;
use std::collections::BTreeSet;

fn document() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../openapi.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn schema_of(v: &Value) -> Option<String> {
    // The one content type of the body (JSON, or newline-delimited JSON for a pull).
    let s = &v["content"].as_object()?.values().next()?["schema"];
    let name = |r: &Value| {
        r["$ref"]
            .as_str()
            .map(|r| r.rsplit('/').next().unwrap().to_owned())
    };
    if s["type"] == "array" {
        return name(&s["items"]).map(|n| format!("[{n}]"));
    }
    // An optional body is `oneOf: [null, $ref]`.
    if let Some(alts) = s["oneOf"].as_array() {
        return alts.iter().find_map(name);
    }
    name(s)
}

#[test]
fn the_client_calls_exactly_the_documented_operations() {
    let doc = document();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            documented.insert((
                op["operationId"].as_str().unwrap().to_owned(),
                method.to_uppercase(),
                path.clone(),
            ));
        }
    }
    let client: BTreeSet<_> = OPERATIONS
        .iter()
        .map(|o| (o.id.to_owned(), o.method.to_owned(), o.path.to_owned()))
        .collect();
    let missing: Vec<_> = documented.difference(&client).collect();
    let unknown: Vec<_> = client.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "documented, no client method: {missing:?}"
    );
    assert!(
        unknown.is_empty(),
        "client methods the document lacks: {unknown:?}"
    );
}

#[test]
fn the_client_sends_and_reads_the_documented_schemas() {
    let doc = document();
    for o in OPERATIONS {
        let op = &doc["paths"][o.path][o.method.to_lowercase()];
        let request = op.get("requestBody").and_then(schema_of);
        assert_eq!(request.as_deref(), o.request, "{}: request body", o.id);
        let success = op["responses"]
            .as_object()
            .unwrap()
            .iter()
            .find(|(s, _)| s.starts_with('2'))
            .map(|(_, r)| r)
            .unwrap_or_else(|| panic!("{}: no success answer", o.id));
        assert_eq!(
            schema_of(success).as_deref(),
            Some(o.response),
            "{}: answer",
            o.id
        );
        // Every path parameter the template names is one the document declares.
        let params: BTreeSet<&str> = op["parameters"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter(|p| p["in"] == "path")
                    .map(|p| p["name"].as_str().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        let wanted: BTreeSet<&str> = o
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        assert_eq!(params, wanted, "{}: path parameters", o.id);
    }
}
