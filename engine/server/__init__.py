"""The trio socket layer around the engine: the websocket gateway, the metrics endpoint,
the server's config file, and the runner that starts and stops them together."""
