"""An AWS endpoint stand-in on 127.0.0.1 that checks Signature Version 4 with botocore (the AWS
SDK for Python's own signer), independent of the keyholder's Rust signer.

    python verifier.py '<json config>'

Config: {"port", "region", "service", "keys": [{"accessKeyId", "secretAccessKey",
"sessionToken"?}], "sts": {"accessKeyId", "secretAccessKey", "sessionToken", "roleArn"}?}.
With "sts", a signed `Action=AssumeRole` (service "sts", same region) made with one of "keys"
answers those session credentials, and from then on only the session key is accepted for other
calls. Every request is recorded; `GET /__records` returns them (JSON).

The region and service are the endpoint's own, never taken from the request: a request signed
for another region or service fails, as it does at AWS. A present `x-amz-content-sha256` must be
the body's SHA-256 (or `UNSIGNED-PAYLOAD`, for S3 only); without it the body hash is computed.
"""

import base64
import datetime
import hashlib
import hmac
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

CONFIG = json.loads(sys.argv[1])
RECORDS = []
LOCK = threading.Lock()
SESSION_ISSUED = threading.Event()


def parse_authorization(value):
    if not value or not value.startswith("AWS4-HMAC-SHA256 "):
        return None
    parts = {}
    for item in value[len("AWS4-HMAC-SHA256 "):].split(","):
        name, _, val = item.strip().partition("=")
        parts[name] = val
    try:
        key_id, date, region, service, term = parts["Credential"].split("/")
    except (KeyError, ValueError):
        return None
    return {
        "key_id": key_id,
        "date": date,
        "region": region,
        "service": service,
        "term": term,
        "signed_headers": parts.get("SignedHeaders", "").split(";"),
        "signature": parts.get("Signature", ""),
    }


def verify(method, path, headers, body, service, region, allowed_keys):
    """Returns (True, key id) or (False, reason)."""
    auth = parse_authorization(headers.get("authorization"))
    if auth is None:
        return False, "missing or malformed Authorization"
    key = next((k for k in allowed_keys if k["accessKeyId"] == auth["key_id"]), None)
    if key is None:
        return False, "InvalidAccessKeyId"
    amz_date = headers.get("x-amz-date", "")
    try:
        at = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(
            tzinfo=datetime.timezone.utc
        )
    except ValueError:
        return False, "missing x-amz-date"
    now = datetime.datetime.now(datetime.timezone.utc)
    if abs((now - at).total_seconds()) > 900:
        return False, "RequestTimeTooSkewed"
    if "host" not in auth["signed_headers"]:
        return False, "host is not signed"
    for name in auth["signed_headers"]:
        if name not in headers:
            return False, f"signed header {name} missing"
    token = key.get("sessionToken")
    if token is not None:
        if headers.get("x-amz-security-token") != token:
            return False, "InvalidToken"
        if "x-amz-security-token" not in auth["signed_headers"]:
            return False, "x-amz-security-token is not signed"
    declared = headers.get("x-amz-content-sha256")
    if declared is not None:
        if declared == "UNSIGNED-PAYLOAD":
            if service != "s3":
                return False, "UNSIGNED-PAYLOAD outside S3"
        elif declared != hashlib.sha256(body).hexdigest():
            return False, "XAmzContentSHA256Mismatch"
    signed = {name: headers[name] for name in auth["signed_headers"]}
    request = AWSRequest(
        method=method, url="http://" + headers["host"] + path, data=body, headers=signed
    )
    request.context["timestamp"] = amz_date
    signer_class = S3SigV4Auth if service == "s3" else SigV4Auth
    signer = signer_class(
        Credentials(key["accessKeyId"], key["secretAccessKey"], token), service, region
    )
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    computed = signer.signed_headers(signer.headers_to_sign(request))
    if computed != ";".join(auth["signed_headers"]):
        return False, f"SignedHeaders differ: {computed} != {';'.join(auth['signed_headers'])}"
    if not hmac.compare_digest(expected, auth["signature"]):
        return False, "SignatureDoesNotMatch"
    return True, key["accessKeyId"]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body, content_type):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def handle_any(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        if self.command == "GET" and self.path == "/__records":
            with LOCK:
                return self.answer(200, json.dumps(RECORDS), "application/json")
        sts = CONFIG.get("sts")
        form = parse_qs(body.decode("latin-1")) if body else {}
        if sts and form.get("Action") == ["AssumeRole"]:
            ok, detail = verify(
                self.command, self.path, headers, body, "sts", CONFIG["region"], CONFIG["keys"]
            )
            kind = "sts"
            if ok and form.get("RoleArn") != [sts["roleArn"]]:
                ok, detail = False, "AccessDenied: unknown role"
        else:
            keys = [sts] if sts and SESSION_ISSUED.is_set() else CONFIG["keys"]
            if sts and not SESSION_ISSUED.is_set():
                keys = []
            ok, detail = verify(
                self.command, self.path, headers, body, CONFIG["service"], CONFIG["region"], keys
            )
            kind = "api"
        with LOCK:
            RECORDS.append(
                {
                    "kind": kind,
                    "method": self.command,
                    "path": self.path,
                    "headers": headers,
                    "body": base64.b64encode(body).decode(),
                    "ok": ok,
                    "detail": detail,
                }
            )
        if not ok:
            return self.answer(
                403,
                f"<Error><Code>SignatureDoesNotMatch</Code><Message>{detail}</Message></Error>",
                "application/xml",
            )
        if kind == "sts":
            SESSION_ISSUED.set()
            expires = (
                datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
            ).strftime("%Y-%m-%dT%H:%M:%SZ")
            return self.answer(
                200,
                "<AssumeRoleResponse><AssumeRoleResult><Credentials>"
                f"<AccessKeyId>{sts['accessKeyId']}</AccessKeyId>"
                f"<SecretAccessKey>{sts['secretAccessKey']}</SecretAccessKey>"
                f"<SessionToken>{sts['sessionToken']}</SessionToken>"
                f"<Expiration>{expires}</Expiration>"
                "</Credentials></AssumeRoleResult></AssumeRoleResponse>",
                "text/xml",
            )
        if CONFIG["service"] == "s3" and "list-type=2" in self.path:
            return self.answer(
                200,
                "<ListBucketResult><Name>demo</Name><KeyCount>1</KeyCount>"
                "<Contents><Key>hello.txt</Key><Size>5</Size></Contents></ListBucketResult>",
                "application/xml",
            )
        # Echoes the session token, as a careless upstream might: the keyholder must redact it.
        answer = {"ok": True, "accessKeyId": detail, "token": headers.get("x-amz-security-token")}
        return self.answer(200, json.dumps(answer), "application/json")

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = handle_any


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", CONFIG["port"]), Handler)
    print("ready", flush=True)
    server.serve_forever()
