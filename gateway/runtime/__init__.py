"""Running the gateway: one process (`serve`) or a supervised group of workers."""
