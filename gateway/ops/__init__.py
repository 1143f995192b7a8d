"""What operators see and do: metrics, audit and access logs, the admin API, explain, reload."""
