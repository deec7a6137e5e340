"""rawgate's own upstream HTTP client: the connection pool, HTTP/1.1 and HTTP/2 client connections, the network backends (TCP, TLS, CONNECT proxy). Depends on the base modules only."""
