"""Many replicas as one: the Redis-shared identity cache and the revocation bus."""
