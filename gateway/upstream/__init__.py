"""The upstream side: the aiohttp client that opens, reads and resumes a topic's backend stream.

It implements the hub's `Upstreams` interface; a cluster backend extends it here.
"""
