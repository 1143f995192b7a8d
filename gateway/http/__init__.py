"""HTTP plumbing under the proxy listener: the server, header names, the client's address."""
