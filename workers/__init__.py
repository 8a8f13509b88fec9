"""One module per process role: fetcher, decoder, gpu. Each has ``main(conn, config)``."""
