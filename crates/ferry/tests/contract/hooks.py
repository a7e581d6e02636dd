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
