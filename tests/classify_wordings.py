"""Real-world buildctl/buildx error wordings for the classifier tests (data only)."""

from __future__ import annotations

# --- real-world wordings -----------------------------------------------------------------------

# One wording per entry: "T|P reason  text"; a line starting with "|" continues the text above
# (everything after the "|" is appended verbatim). Shapes are from buildctl/buildx reports in the wild.
_WORDINGS_TABLE = """
T daemon_unavailable  failed to receive status: rpc error: code = Unavailable desc = transport is closing
T daemon_unavailable  failed to receive status: rpc error: code = Unavailable desc = error reading from
  | server: EOF
T daemon_unavailable  failed to receive status: rpc error: code = Unavailable desc = keepalive ping failed
  | to receive ACK within timeout
T daemon_unavailable  failed to receive status: rpc error: code = Unavailable desc = the client connection
  | is closing
T daemon_unavailable  failed to solve: Canceled: grpc: the client connection is closing
T daemon_unavailable  failed to receive status: rpc error: code = Unavailable desc = error reading from
  | server: read unix @->/run/buildkit/buildkitd.sock: read: connection reset by peer
T daemon_unavailable  failed to solve: Unavailable: error reading from server: EOF
T goaway  failed to receive status: rpc error: code = Unavailable desc = closing transport due to:
  | connection error: desc = "error reading from server: EOF", received prior goaway: code: NO_ERROR, debug
  | data: "graceful_stop"
T goaway  failed to receive status: rpc error: code = Unavailable desc = received prior goaway: code:
  | ENHANCE_YOUR_CALM, debug data: "too_many_pings"
T goaway  failed to solve: failed to do request: Head "https://registry.example.com/v2/app/manifests/1":
  | http2: server sent GOAWAY and closed the connection; LastStreamID=1999, ErrCode=NO_ERROR
T stream_reset  failed to solve: Internal: stream terminated by RST_STREAM with error code: INTERNAL_ERROR
T stream_reset  failed to receive status: rpc error: code = Internal desc = stream terminated by RST_STREAM
  | with error code: PROTOCOL_ERROR
T daemon_unreachable  failed to get status: rpc error: code = Unavailable desc = all SubConns are in
  | TransientFailure, latest connection error: connection error: desc = "transport: error while dialing:
  | dial unix /run/buildkit/buildkitd.sock: connect: no such file or directory"
T daemon_unreachable  failed to solve: Unavailable: connection error: desc = "transport: Error while
  | dialing: dial unix /run/buildkit/buildkitd.sock: connect: connection refused"
T daemon_unreachable  listing workers for Build: failed to list workers: DeadlineExceeded: context deadline
  | exceeded
T daemon_unreachable  listing workers for Build: failed to list workers: rpc error: code = DeadlineExceeded
  | desc = context deadline exceeded
T daemon_unreachable  listing workers for Build: failed to list workers: Unavailable: connection error:
  | desc = "transport: Error while dialing: dial tcp 10.0.0.7:1234: connect: connection reset by peer"
T registry_unavailable  failed to solve: rpc error: code = Unknown desc = unexpected status: 503 Service
  | Unavailable
T registry_unavailable  failed to solve: rpc error: code = Unknown desc = unexpected status: 502 Bad Gateway
T registry_unavailable  failed to solve: failed to push ghcr.io/acme/app:1: unexpected status from PUT
  | request to https://ghcr.io/v2/acme/app/manifests/1: 500 Internal Server Error
T registry_unavailable  failed to solve: failed to push registry.example.com/app:1: unexpected status from
  | POST request to https://registry.example.com/v2/app/blobs/uploads/: 504 Gateway Timeout
T registry_unavailable  failed to solve: failed to push registry.example.com/app:1: unexpected status: 507
  | Insufficient Storage
T registry_unavailable  failed to solve: golang:1.23.6-alpine3.20: failed to resolve source metadata for
  | docker.io/library/golang:1.23.6-alpine3.20: failed to copy: httpReadSeeker: failed open: unexpected
  | status code https://registry-1.docker.io/v2/library/golang/blobs/sha256:d945: 500 Internal Server Error
T registry_unavailable  failed to solve: alpine:3.20: failed to resolve source metadata for
  | docker.io/library/alpine:3.20: failed to copy: httpReadSeeker: failed open: unexpected status code
  | https://registry-1.docker.io/v2/library/alpine/manifests/sha256:95: 429 Too Many Requests - Server
  | message: toomanyrequests: You have reached your pull rate limit.
T registry_unavailable  failed to solve: failed to authorize: failed to fetch oauth token: unexpected
  | status from GET request to https://auth.docker.io/token?scope=repository%3Aacme%2Fapp%3Apull%2Cpush:
  | 503 Service Unavailable
T registry_unavailable  failed to solve: node:20-alpine: failed to resolve source metadata for
  | docker.io/library/node:20-alpine: failed to do request: Head
  | "https://dockerproxy.com/v2/library/node/manifests/20-alpine?ns=docker.io": read tcp
  | 192.168.127.130:44148->150.136.252.237:443: read: connection reset by peer
T registry_unavailable  failed to solve: postgis/postgis:15: failed to resolve source metadata for
  | docker.io/postgis/postgis:15: failed to do request: Head
  | "https://registry-1.docker.io/v2/postgis/postgis/manifests/15": dial tcp: lookup registry-1.docker.io
  | on 127.0.0.53:53: read udp 127.0.0.1:46706->127.0.0.53:53: i/o timeout
T registry_unavailable  failed to solve: failed to do request: Head
  | "https://distrib:5000/v2/img/manifests/8": dial tcp: lookup distrib on 10.0.0.2:53: no such host
T registry_unavailable  failed to solve: failed to push acme/app:latest: failed to do request: Post
  | "https://registry-1.docker.io/v2/acme/app/blobs/uploads/": EOF
T registry_unavailable  failed to solve: failed to push ghcr.io/acme/kali:latest: failed to copy: io:
  | read/write on closed pipe
T registry_unavailable  failed to solve: failed to push registry.example.com/app:1: failed to copy: failed
  | to do request: Put "https://registry.example.com/v2/app/blobs/uploads/8e62?digest=sha256%3A0f0a": write
  | tcp 172.17.0.2:59112->98.85.153.80:443: write: broken pipe
T registry_unavailable  failed to solve: failed to push 127.0.0.1:5000/demo/app:1: failed to copy:
  | unexpected EOF
T registry_unavailable  failed to solve: failed to do request: Head
  | "https://registry.example.com/v2/app/manifests/1": net/http: TLS handshake timeout
T registry_unavailable  failed to solve: DeadlineExceeded: failed to fetch anonymous token: Get
  | "https://auth.docker.io/token?scope=repository%3Alibrary%2Falpine%3Apull": context deadline exceeded
T resource_exhausted  failed to solve: rpc error: code = ResourceExhausted desc = too many concurrent solves
T deadline_exceeded  failed to call info: DeadlineExceeded: context deadline exceeded
T canceled  failed to solve: context canceled
T network_error  failed to solve: failed to read downloaded context: unexpected EOF
T daemon_storage  failed to solve: failed to prepare extraction snapshot "extract-1": write
  | /var/lib/buildkit/runc-overlayfs/snapshots/12/fs/x: no space left on device
T daemon_storage  failed to solve: ResourceExhausted: failed to add snapshot t3xfp1tww56tj9fmwfbsqq6kr to
  | lease: write /var/lib/buildkit/runc-native/containerdmeta.db: no space left on device
T daemon_storage  failed to solve: write /var/lib/buildkit/runc-overlayfs/metadata_v2.db: read-only file
  | system
P step_failed  failed to solve: process "/bin/sh -c false" did not complete successfully: exit code: 1
P step_failed  failed to solve: process "/bin/sh -c apk --no-cache add curl && npm ci" did not complete
  | successfully: exit code: 1
P step_failed  failed to solve: process "/bin/sh -c curl -fsS https://example.com/ || echo 503 Service
  | Unavailable: connection refused" did not complete successfully: exit code: 7
P step_failed  failed to solve: process "/bin/sh -c make -j4" did not complete successfully: exit code: 137
P step_failed  failed to solve: executor failed running [/bin/sh -c npm install]: exit code: 1
P dockerfile_syntax  failed to solve: dockerfile parse error on line 3: unknown instruction: FROMM (did you
  | mean FROM?)
P dockerfile_syntax  failed to solve: dockerfile parse error on line 7: FROM requires either one or three
  | arguments
P dockerfile_syntax  failed to solve: failed to process "${FOO": unexpected end of statement while looking
  | for matching }
P missing_file  failed to solve: failed to compute cache key: failed to calculate checksum of ref
  | q8gykwt255nt8lrz6vhq9cogz::w59n98i72bisubs8sg3iaktqa: "/ui-v2": not found
P missing_file  failed to compute cache key: "/executionserver" not found: not found
P missing_file  failed to solve: failed to read dockerfile: open Dockerfile: no such file or directory
P invalid_reference  failed to solve: invalid reference format: repository name must be lowercase
P invalid_reference  failed to solve: failed to configure registry cache exporter: invalid reference
  | format: repository name (NotPunchnox/rkllama) must be lowercase
P invalid_reference  failed to solve: failed to parse image reference "foo::bar"
P registry_auth  failed to solve: failed to push cr.example.cn/acme/server: unexpected status from HEAD
  | request to https://cr.example.cn/v2/acme/server/blobs/sha256:4227: 401 Unauthorized
P registry_auth  failed to solve: authorization status: 401: authorization failed
P registry_auth  failed to solve: rpc error: code = Unknown desc = failed commit on ref
  | "manifest-sha256:8767": unexpected status: 401 Unauthorized
P registry_auth  failed to solve: failed to push ghcr.io/base-org/node:main: unexpected status from POST
  | request to https://ghcr.io/v2/base-org/node/blobs/uploads/: 403 Forbidden
P registry_auth  failed to solve: builder: failed to resolve source metadata for
  | docker.io/library/builder:latest: pull access denied, repository does not exist or may require
  | authorization: server message: insufficient_scope: authorization failed
P registry_auth  failed to solve: failed to push docker.io/acme/app:1: denied: requested access to the
  | resource is denied
P registry_auth  failed to solve: failed to push quay.io/acme/app:1: unauthorized: authentication required
P registry_auth  failed to solve: freesurfer/freesurfer:7.4.1: failed to resolve source metadata for
  | docker.io/freesurfer/freesurfer:7.4.1: failed to authorize: failed to fetch oauth token: unexpected
  | status from GET request to
  | https://auth.docker.io/token?scope=repository%3Afreesurfer%2Ffreesurfer%3Apull: 401 Unauthorized
P registry_auth  failed to solve: rpc error: code = Unavailable desc = failed to push: unexpected status:
  | 401 Unauthorized
P registry_unsupported  failed to solve: failed to push registry.example.com/app:1: unexpected status from
  | PUT request to https://registry.example.com/v2/app/manifests/1: 501 Not Implemented
P tls_error  failed to solve: failed to do request: Head "https://127.0.0.1:5000/v2/demo/app/manifests/1":
  | http: server gave HTTP response to HTTPS client
P tls_error  failed to solve: failed to do request: Head "https://registry.internal/v2/app/manifests/1":
  | tls: failed to verify certificate: x509: certificate signed by unknown authority
P tls_error  listing workers for Build: failed to list workers: Unavailable: connection error: desc =
  | "transport: authentication handshake failed: x509: certificate signed by unknown authority"
P permission_denied  listing workers for Build: failed to list workers: Unavailable: connection error: desc
  | = "transport: Error while dialing: dial unix /run/buildkit/buildkitd.sock: connect: permission denied"
P image_not_found  failed to solve: alpine:3.99: failed to resolve source metadata for
  | docker.io/library/alpine:3.99: docker.io/library/alpine:3.99: not found
P image_not_found  failed to solve: 127.0.0.1:5000/base:1: failed to resolve source metadata for
  | 127.0.0.1:5000/base:1: 127.0.0.1:5000/base:1: not found
P invalid_cache_config  failed to solve: invalid configuration for remote cache
P message_too_large  failed to solve: rpc error: code = ResourceExhausted desc = grpc: received message
  | larger than max (4564294 vs. 4194304)
P invalid_option  failed to solve: failed to parse platform "linux/amd65": unknown operating system or
  | architecture
P invalid_option  flag provided but not defined: -frobnicate
P unknown  failed to solve: failed to compute cache key: blob not found
P unknown  failed to solve: something nobody has seen before
"""


def _parse_wordings(table: str) -> list[tuple[str, bool, str]]:
    entries: list[list[str]] = []
    for line in table.strip().splitlines():
        if line.lstrip().startswith("|"):
            entries[-1][2] += line.lstrip()[1:]
        else:
            kind, reason, text = line.split(maxsplit=2)
            entries.append([kind, reason, text])
    return [(text, kind == "T", reason) for kind, reason, text in entries]


WORDINGS = _parse_wordings(_WORDINGS_TABLE)
