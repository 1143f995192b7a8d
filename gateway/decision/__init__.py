"""The decision listener (auth_request, ext_authz) for someone else's proxy."""
