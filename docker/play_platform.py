#!/usr/bin/env python3
"""Plays the platform and an agent against a running keyholder, for docker/test.sh (standard
library only): exchange a bind code, store a credential with a store ticket, fetch it back with an
agent_credential ticket. Tickets are `<base64url(json)>.<hex HMAC-SHA256>` as PROTOCOL.md 2.2 says."""

import base64
import hashlib
import hmac
import json
import os
import ssl
import sys
import time
import urllib.parse
import urllib.request


def call(base, method, path, body=None, cafile=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    context = ssl.create_default_context(cafile=cafile) if base.startswith("https") else None
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def ticket(secret, purpose, service):
    now = int(time.time())
    claims = {"sub": "user_container", "svc": service, "pur": purpose, "iat": now,
              "exp": now + 60, "nonce": os.urandom(16).hex()}
    payload = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode())
    payload = payload.rstrip(b"=").decode()
    sig = hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()
    return payload + "." + sig


def main():
    command, base, state_file = sys.argv[1], sys.argv[2], sys.argv[3]
    cafile = os.environ.get("KEYHOLDER_TEST_CA")
    service, value = "github", "ghp_container_" + "x" * 12
    if command == "bind-store":
        code = json.loads(sys.stdin.read())["code"]
        status, answer = call(base, "POST", "/v1/exchange", {"code": code}, cafile)
        assert status == 200, (status, answer)
        secret = base64.b64decode(answer["hmacSecret"])
        with open(state_file, "w") as f:
            f.write(answer["hmacSecret"])
        body = {"ticket": ticket(secret, "store", service), "service": service,
                "tokenData": {"accessToken": value, "tokenType": "oauth"}}
        status, answer = call(base, "POST", "/v1/store", body, cafile)
        assert status == 200 and answer["status"] == "stored", (status, answer)
        print("stored", service)
    with open(state_file) as f:
        secret = base64.b64decode(f.read())
    query = urllib.parse.urlencode({"ticket": ticket(secret, "agent_credential", service),
                                    "service": service})
    status, answer = call(base, "GET", "/v1/credential?" + query, None, cafile)
    assert status == 200 and answer["token"]["accessToken"] == value, (status, answer)
    print("fetched", service)


if __name__ == "__main__":
    main()
