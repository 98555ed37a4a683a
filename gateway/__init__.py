"""sse-gateway: a reverse-proxy gateway for Server-Sent Events."""

__version__ = "0.1.0"
