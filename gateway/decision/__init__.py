"""Decision mode (CONTRACT 9): the gateway's decision for a data plane a team already runs.

`listener` serves `/auth` (nginx `auth_request`, Traefik ForwardAuth, Caddy
`forward_auth`) and `/ext_authz/{path}` (Envoy's HTTP ext_authz); `original`
reads the original request from a decision request; `engine` is the one call
into the decision engine (`gateway.auth.decide`); `answer` turns its outcome into
the allow or deny answer; `dataplane` prints the configurations of the four data
planes.
"""
