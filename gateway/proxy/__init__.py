"""Streamed forwarding of an authorised request to its upstream, under the route's deadline."""
