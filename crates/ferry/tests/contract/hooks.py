"""schemathesis hooks for crates/ferry/tests/api_contract.rs (loaded through SCHEMATHESIS_HOOKS).

A machine config with an `image` makes its host pull from the registry the reference names,
and tests send traffic only to loopback and their own namespaces: generated configs keep every
other field, without `image`. Images have their own tests with a registry on loopback
(crates/ferry/tests/images.rs).
"""

import schemathesis


@schemathesis.hook
def map_body(context, body):
    if isinstance(body, dict) and isinstance(body.get("config"), dict):
        body["config"].pop("image", None)
    return body


@schemathesis.hook
def map_query(context, query):
    # `follow=true` keeps a log answer open until its machine is destroyed, which a generated
    # request never does: schemathesis would only see its request timeout. Following is tested
    # end to end in crates/ferry/tests/logs.rs.
    if isinstance(query, dict):
        query.pop("follow", None)
    return query
