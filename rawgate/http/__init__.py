"""The inbound server: the listener, the HTTP/1.1 and HTTP/2 drivers, the request seam's router and auth (app). Depends on the base modules only."""
