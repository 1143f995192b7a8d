"""The decision: credentials, identity (cache, tower), capabilities, policy, limits, tokens."""
